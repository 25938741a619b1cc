package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/internal/kilnenv"
	"github.com/kilnml/kiln/registry"
	"github.com/kilnml/kiln/registry/runlog"
)

// registryFlags are the flags that reach the model registry.
type registryFlags struct {
	dsn       string // --registry
	artifacts string // --registry-artifacts
	actor     string // --actor
}

func (f *registryFlags) addTo(fs *pflag.FlagSet) {
	fs.StringVar(&f.dsn, "registry", "", "model registry: a SQLite file, sqlite://PATH or postgres://... (default $KILN_REGISTRY, else $KILN_HOME/registry.db, KILN_HOME defaulting to ~/.kiln)")
	fs.StringVar(&f.artifacts, "registry-artifacts", "", "the registry's artifact root: a directory or s3://bucket/prefix (default $KILN_REGISTRY_ARTIFACTS, else artifacts/ beside a SQLite file, $KILN_HOME/artifacts for PostgreSQL)")
	fs.StringVar(&f.actor, "actor", "", "who acts, recorded with runs, versions and alias moves (default: the OS user)")
}

// who is the actor: --actor, else the OS user's name.
func (f registryFlags) who() string {
	if f.actor != "" {
		return f.actor
	}
	return runlog.DefaultActor()
}

// configured reports whether a registry was named (--registry or
// $KILN_REGISTRY): training commands record runs only then, or with
// --register.
func (f registryFlags) configured() (bool, error) {
	vars, err := kilnenv.Load(os.Getenv)
	if err != nil {
		return false, err
	}
	return vars.RegistryConfigured(f.dsn), nil
}

// open opens the registry: --registry, else $KILN_REGISTRY, else
// registry.db in the data directory, with its artifacts at
// --registry-artifacts, else $KILN_REGISTRY_ARTIFACTS (a directory or
// s3://bucket/prefix), else beside a SQLite file and in the data
// directory's artifacts/ for PostgreSQL (a root the servers sharing the
// registry must share); the key comes from $KILN_REGISTRY_KEY or
// $KILN_REGISTRY_KEY_FILE.
func (f registryFlags) open(ctx context.Context) (*registry.Registry, error) {
	vars, err := kilnenv.Load(os.Getenv)
	if err != nil {
		return nil, err
	}
	dsn, artifacts, err := vars.RegistryLocation(f.dsn, f.artifacts)
	if err != nil {
		return nil, fmt.Errorf("kiln: registry: %w", err)
	}
	key, err := registry.LoadKey(vars.RegistryKey, vars.RegistryKeyFile)
	if err != nil {
		return nil, fmt.Errorf("kiln: %w", err)
	}
	return registry.Open(ctx, dsn, registry.Options{ArtifactDir: artifacts, Key: key, S3PathStyle: vars.S3PathStyle})
}

func newRegistryCmd() *cobra.Command {
	var rf registryFlags
	var jsonOut bool
	cmd := &cobra.Command{
		Use:   "registry",
		Short: "The model registry: registered models, versions, runs, aliases and their history",
		Long: `Reads and moves the model registry (see the registry package): registered
models with immutable versions (artifact SHA-256, size, run, parent, lineage),
runs of kiln train/select/optimize, and aliases moved by compare-and-swap
with every move kept in the history.

The registry is --registry, else $KILN_REGISTRY, else registry.db in the data
directory ($KILN_HOME, default ~/.kiln), a SQLite file whose artifacts live in
artifacts/ beside it. postgres://... names a PostgreSQL registry shared by
several servers; its artifacts then live in $KILN_HOME/artifacts, which those
servers must share, or, with --registry-artifacts s3://bucket/prefix (or
$KILN_REGISTRY_ARTIFACTS), in S3-compatible object storage configured by the
AWS environment (AWS_ENDPOINT_URL_S3, AWS_REGION, AWS_ACCESS_KEY_ID, ...,
KILN_S3_PATH_STYLE). Artifacts are encrypted with $KILN_REGISTRY_KEY or the key
in $KILN_REGISTRY_KEY_FILE (32 bytes: raw, hex or base64) when one is set.`,
	}
	rf.addTo(cmd.PersistentFlags())
	cmd.PersistentFlags().BoolVar(&jsonOut, "json", false, "print JSON")
	with := func(run func(ctx context.Context, r *registry.Registry, w io.Writer, args []string) (any, error)) func(*cobra.Command, []string) error {
		return func(c *cobra.Command, args []string) error {
			r, err := rf.open(c.Context())
			if err != nil {
				return err
			}
			defer r.Close()
			var table strings.Builder
			v, err := run(c.Context(), r, &table, args)
			if err != nil {
				return err
			}
			if jsonOut {
				enc := json.NewEncoder(c.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(v)
			}
			_, err = io.WriteString(c.OutOrStdout(), table.String())
			return err
		}
	}
	ls := &cobra.Command{
		Use: "ls", Short: "List registered models", Args: cobra.NoArgs,
		RunE: with(func(ctx context.Context, r *registry.Registry, w io.Writer, _ []string) (any, error) {
			ms, err := r.Models(ctx)
			if err != nil {
				return nil, err
			}
			tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tLATEST\tALIASES\tCREATED\tBY")
			for _, m := range ms {
				fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\n", m.Name, m.LatestVersion, aliasList(m.Aliases), stamp(m.CreatedAt), m.CreatedBy)
			}
			return orEmpty(ms), tw.Flush()
		}),
	}
	show := &cobra.Command{
		Use: "show NAME|models:/NAME/VERSION|models:/NAME@ALIAS", Short: "Show a registered model, or one version with its lineage", Args: cobra.ExactArgs(1),
		RunE: with(func(ctx context.Context, r *registry.Registry, w io.Writer, args []string) (any, error) {
			if strings.HasPrefix(args[0], registry.URIScheme) {
				v, err := r.Resolve(ctx, args[0])
				if err != nil {
					return nil, err
				}
				b, _ := json.MarshalIndent(v.Lineage, "", "  ")
				fmt.Fprintf(w, "model    %s\nversion  %d\ndigest   sha256:%s\nsize     %d\nrun      %s\nparent   %s\naliases  %s\ncreated  %s by %s\nlineage  %s\n",
					v.Model, v.Version, v.Digest, v.Size, v.RunID, parentOf(v), strings.Join(v.Aliases, ", "), stamp(v.CreatedAt), v.CreatedBy, b)
				return v, nil
			}
			m, err := r.Model(ctx, args[0])
			if err != nil {
				return nil, err
			}
			vs, err := r.Versions(ctx, args[0])
			if err != nil {
				return nil, err
			}
			fmt.Fprintf(w, "model    %s\nlatest   %d\naliases  %s\ncreated  %s by %s\n", m.Name, m.LatestVersion, aliasList(m.Aliases), stamp(m.CreatedAt), m.CreatedBy)
			if m.Description != "" {
				fmt.Fprintf(w, "about    %s\n", m.Description)
			}
			fmt.Fprintln(w)
			writeVersions(w, vs)
			return struct {
				registry.Model
				Versions []registry.Version `json:"versions"`
			}{m, orEmpty(vs)}, nil
		}),
	}
	versions := &cobra.Command{
		Use: "versions NAME", Short: "List a model's versions, newest first", Args: cobra.ExactArgs(1),
		RunE: with(func(ctx context.Context, r *registry.Registry, w io.Writer, args []string) (any, error) {
			vs, err := r.Versions(ctx, args[0])
			if err != nil {
				return nil, err
			}
			writeVersions(w, vs)
			return orEmpty(vs), nil
		}),
	}
	var runModel string
	var runLimit int
	runs := &cobra.Command{
		Use: "runs [--model NAME]", Short: "List runs of kiln train, select and optimize, newest first", Args: cobra.NoArgs,
		RunE: with(func(ctx context.Context, r *registry.Registry, w io.Writer, _ []string) (any, error) {
			rs, err := r.Runs(ctx, runModel, runLimit)
			if err != nil {
				return nil, err
			}
			tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "RUN\tKIND\tMODEL\tSTATUS\tSTARTED\tSECONDS\tMETRICS\tERROR")
			for _, run := range rs {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%.1f\t%s\t%s\n", run.ID, run.Kind, run.Model, run.Status, stamp(run.StartedAt), run.Seconds,
					metricList(run.Metrics), firstLine(run.Error))
			}
			return orEmpty(rs), tw.Flush()
		}),
	}
	runs.Flags().StringVar(&runModel, "model", "", "only the runs for this registered model")
	runs.Flags().IntVar(&runLimit, "limit", 0, "at most this many (0: all)")

	alias := &cobra.Command{Use: "alias", Short: "Move a model's aliases"}
	var expect, reason, verdict string
	set := &cobra.Command{
		Use:   "set NAME ALIAS VERSION [--expect V|none] [--reason TEXT]",
		Short: "Point ALIAS at VERSION by compare-and-swap, recording the move",
		Long: `Moves ALIAS of model NAME to VERSION only if the alias still points where it
is expected to: --expect V (a version) or --expect none (the alias must not
exist yet); without --expect, where it points now, read just before. When
another process moved it first the command fails and changes nothing. The
move is recorded (when, --actor, from, to, --reason, --verdict).`,
		Args: cobra.ExactArgs(3),
		RunE: with(func(ctx context.Context, r *registry.Registry, w io.Writer, args []string) (any, error) {
			to, err := strconv.Atoi(args[2])
			if err != nil || to < 1 {
				return nil, fmt.Errorf("kiln: registry alias set: VERSION %q is not a positive integer", args[2])
			}
			var from int
			switch expect {
			case "":
				from, err = r.Alias(ctx, args[0], args[1])
				if err != nil && !isNotFound(err) {
					return nil, err
				}
			case "none":
			default:
				if from, err = strconv.Atoi(expect); err != nil || from < 1 {
					return nil, fmt.Errorf("kiln: registry alias set: --expect %q: want a version or none", expect)
				}
			}
			ev, err := r.CompareAndSwap(ctx, registry.Move{Model: args[0], Alias: args[1], Expected: from, To: to,
				Actor: rf.who(), Reason: reason, Verdict: verdict})
			if err != nil {
				return nil, err
			}
			fmt.Fprintf(w, "%s@%s: %s -> %d\n", ev.Model, ev.Alias, versionOrNone(ev.From), ev.To)
			return ev, nil
		}),
	}
	set.Flags().StringVar(&expect, "expect", "", "the version the alias must point at now, or none")
	set.Flags().StringVar(&reason, "reason", "", "why, recorded in the history")
	set.Flags().StringVar(&verdict, "verdict", "", "an evaluation verdict, recorded in the history")
	alias.AddCommand(set)

	history := &cobra.Command{
		Use: "history NAME [ALIAS]", Short: "Show the moves of a model's aliases, oldest first", Args: cobra.RangeArgs(1, 2),
		RunE: with(func(ctx context.Context, r *registry.Registry, w io.Writer, args []string) (any, error) {
			a := ""
			if len(args) == 2 {
				a = args[1]
			}
			evs, err := r.History(ctx, args[0], a)
			if err != nil {
				return nil, err
			}
			tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "AT\tALIAS\tFROM\tTO\tACTOR\tREASON\tVERDICT")
			for _, e := range evs {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", stamp(e.At), e.Alias, versionOrNone(e.From), versionOrNone(e.To), e.Actor, e.Reason, e.Verdict)
			}
			return orEmpty(evs), tw.Flush()
		}),
	}
	fetch := &cobra.Command{
		Use: "fetch models:/NAME/VERSION|models:/NAME@ALIAS DIR", Short: "Write a version's model package into a new directory, its digest verified", Args: cobra.ExactArgs(2),
		RunE: with(func(ctx context.Context, r *registry.Registry, w io.Writer, args []string) (any, error) {
			v, err := r.Resolve(ctx, args[0])
			if err != nil {
				return nil, err
			}
			if v, err = r.Fetch(ctx, v.Ref(), args[1]); err != nil {
				return nil, err
			}
			fmt.Fprintf(w, "%s (sha256:%s) -> %s\n", v.Ref(), v.Digest, args[1])
			return v, nil
		}),
	}
	cmd.AddCommand(ls, show, versions, runs, alias, history, fetch)
	return cmd
}

func writeVersions(w io.Writer, vs []registry.Version) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "VERSION\tDIGEST\tSIZE\tRUN\tPARENT\tALIASES\tCREATED\tBY")
	for _, v := range vs {
		run := v.RunID
		if len(run) > 12 {
			run = run[:12]
		}
		fmt.Fprintf(tw, "%d\tsha256:%s\t%d\t%s\t%s\t%s\t%s\t%s\n", v.Version, v.Digest[:12], v.Size, run, parentOf(v), strings.Join(v.Aliases, ","), stamp(v.CreatedAt), v.CreatedBy)
	}
	tw.Flush()
}

func parentOf(v registry.Version) string {
	if v.Parent == nil {
		return ""
	}
	return v.Parent.String()
}

func aliasList(m map[string]int) string {
	parts := make([]string, 0, len(m))
	for a, v := range m {
		parts = append(parts, fmt.Sprintf("%s=%d", a, v))
	}
	sort.Strings(parts)
	return strings.Join(parts, ",")
}

func metricList(m map[string]float64) string {
	parts := make([]string, 0, len(m))
	for k, v := range m {
		parts = append(parts, fmt.Sprintf("%s=%.4g", k, v))
	}
	sort.Strings(parts)
	return strings.Join(parts, " ")
}

func versionOrNone(v int) string {
	if v == 0 {
		return "none"
	}
	return strconv.Itoa(v)
}

func stamp(t time.Time) string { return t.UTC().Format("2006-01-02 15:04:05") }

func firstLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	return s
}

// orEmpty makes a nil list print as [] in JSON.
func orEmpty[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}

func isNotFound(err error) bool { return core.HasCode(err, core.NotFound) }

// startRun opens the registry and starts a run of kind when a registry is
// configured or a version is to be registered (register != ""); else it
// returns nil (a nil tracker records nothing). The tracker closes the
// registry.
func startRun(ctx context.Context, rf registryFlags, register, kind string, params map[string]string) (*runlog.Tracker, error) {
	on, err := rf.configured()
	if err != nil {
		return nil, err
	}
	if !on && register == "" {
		return nil, nil
	}
	r, err := rf.open(ctx)
	if err != nil {
		return nil, err
	}
	tr, err := runlog.Start(ctx, r, kind, params, runlog.Options{Model: register, Actor: rf.who(), CloseRegistry: true})
	if err != nil {
		r.Close()
		return nil, err
	}
	return tr, nil
}
