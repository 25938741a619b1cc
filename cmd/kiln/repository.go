package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/kilnml/kiln/internal/kilnenv"
	"github.com/kilnml/kiln/serving/repository"
	"github.com/kilnml/kiln/serving/repository/s3repo"
)

func newRepositoryCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "repository",
		Short: "Model repositories in S3-compatible object storage",
	}
	var versions []string
	var name string
	push := &cobra.Command{
		Use:   "push MODEL_DIR s3://bucket/prefix [--version N]... [--name NAME]",
		Short: "Upload a local model directory into an S3 model repository, each version's completion marker last",
		Long: `Uploads MODEL_DIR (config.yaml / config.pbtxt, labels, and version
directories 1/, 2/, ...) to s3://bucket/prefix/NAME/ (NAME: --name, else
MODEL_DIR's base name). Each version is written so that a serving Kiln sees
it whole or not at all: its previous .kiln-complete marker is deleted, its
files are uploaded, then the marker (a JSON manifest of every file's path,
size and SHA-256) last. Model files go after the versions. Hidden files are
skipped. --version limits the upload to those versions.

Endpoint, region and credentials come from the AWS environment
(AWS_ENDPOINT_URL_S3, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_PROFILE, ...); KILN_S3_PATH_STYLE=true/false overrides path-style
addressing (default: on with a custom endpoint).`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			dir, dest := args[0], args[1]
			loc, err := s3repo.ParseURL(dest)
			if err != nil {
				return &exitError{exitUsage, fmt.Errorf("repository push: %w", err)}
			}
			model := name
			if model == "" {
				abs, err := filepath.Abs(dir)
				if err != nil {
					return err
				}
				model = filepath.Base(abs)
			}
			if err := repository.ValidModelName(model); err != nil {
				return &exitError{exitUsage, fmt.Errorf("repository push: %w (use --name)", err)}
			}
			var vs []int64
			for _, s := range versions {
				v, err := strconv.ParseInt(s, 10, 64)
				if err != nil || v < 1 {
					return &exitError{exitUsage, fmt.Errorf("repository push: --version %q: want a positive integer", s)}
				}
				vs = append(vs, v)
			}
			vars, err := kilnenv.Load(os.Getenv)
			if err != nil {
				return &exitError{exitUsage, err}
			}
			client, err := s3repo.NewClient(cmd.Context(), s3repo.ClientOptions{PathStyle: vars.S3PathStyle})
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			res, err := s3repo.Push(cmd.Context(), client, dir, loc.Child(model), s3repo.PushOptions{Versions: vs, Progress: func(l string) { fmt.Fprintln(w, l) }})
			if err != nil {
				return &exitError{fetchExit(err), fmt.Errorf("repository push: %w", err)}
			}
			fmt.Fprintf(w, "pushed %s -> %s: versions %s, %d objects, %d bytes\n", dir, loc.Child(model), joinInts(res.Versions), res.Objects, res.Bytes)
			return nil
		},
	}
	push.Flags().StringArrayVar(&versions, "version", nil, "a version to upload (repeatable; default: every version directory)")
	push.Flags().StringVar(&name, "name", "", "the model's name in the repository (default: MODEL_DIR's base name)")
	cmd.AddCommand(push)
	return cmd
}

func joinInts(vs []int64) string {
	if len(vs) == 0 {
		return "none"
	}
	s := make([]string, len(vs))
	for i, v := range vs {
		s[i] = strconv.FormatInt(v, 10)
	}
	return strings.Join(s, ",")
}
