// Command kiln is Kiln's command line: model inspection and batched
// prediction today; training and serving as they land.
package main

import (
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/internal/kilnenv"
)

func main() {
	if err := newRoot().Execute(); err != nil {
		msg := err.Error()
		if !strings.HasPrefix(msg, "kiln: ") {
			msg = "kiln: " + msg
		}
		fmt.Fprintln(os.Stderr, msg)
		os.Exit(exitCode(err))
	}
}

func newRoot() *cobra.Command {
	var threads int
	var verbose bool
	root := &cobra.Command{
		Use:           "kiln",
		Short:         "Kiln: train, optimize, deploy and serve PyTorch-family models",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			level := slog.LevelInfo
			if verbose {
				level = slog.LevelDebug
			}
			slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})))
			return setThreads(threads)
		},
	}
	root.PersistentFlags().IntVar(&threads, "threads", 0, "libtorch intra-op threads (default $KILN_NUM_THREADS, else $OMP_NUM_THREADS, else the number of CPUs)")
	root.PersistentFlags().BoolVarP(&verbose, "verbose", "v", false, "debug logging")
	root.AddCommand(newVersionCmd(), newInfoCmd(), newPredictCmd(), newTrainCmd(), newSelectCmd(), newServeCmd(), newOptimizeCmd(), newEvaluateCmd(), newRegistryCmd(), newPipelineCmd(), newFetchCmd(), newRepositoryCmd(), newRolloutCmd())
	return root
}

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print Kiln's and libtorch's versions, thread counts and whether CUDA is usable",
		Args:  cobra.NoArgs,
		Run: func(cmd *cobra.Command, args []string) {
			fmt.Fprintf(cmd.OutOrStdout(), "kiln %s\nlibtorch %s\nintra-op threads %d\ninter-op threads %d\n",
				core.Version, core.TorchVersion(), core.NumThreads(), core.NumInteropThreads())
			cuda := "no (this libtorch has no CUDA)"
			if core.CUDACompiled() {
				cuda = fmt.Sprintf("yes, %d GPU(s) present", core.CUDADeviceCount())
			}
			fmt.Fprintf(cmd.OutOrStdout(), "cuda %s\n", cuda)
		},
	}
}

func newInfoCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "info MODEL",
		Short: "Describe a TorchScript model or check a Kiln model package: inputs, output type, parameters",
		Long: `Loads MODEL, a TorchScript file or a Kiln model package directory, and
prints its forward's schema, inputs, output type and parameters. A package
is checked first (modelpkg.Check: model.pt and manifest.json present, the
manifest valid, the model loading under its quantized engine) and its
manifest summarized.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			w := cmd.OutOrStdout()
			if st, err := os.Stat(args[0]); err == nil && st.IsDir() {
				man, err := modelpkg.Check(args[0])
				if err != nil {
					return err
				}
				engine, _ := man.QuantizedEngine()
				fmt.Fprintf(w, "package    %s (%s)\nname       %s\ntask       %s\n", args[0], man.Format, man.Name, man.Task)
				if len(man.Labels) > 0 {
					fmt.Fprintf(w, "labels     %s\n", strings.Join(man.Labels, ", "))
				}
				if engine != "" {
					fmt.Fprintf(w, "engine     %s\n", engine)
				}
			}
			m, err := modelpkg.LoadModule(args[0])
			if err != nil {
				return err
			}
			defer m.Close()
			fmt.Fprintf(w, "model      %s\nschema     %s\n", args[0], m.Schema())
			for i, a := range m.Inputs() {
				fmt.Fprintf(w, "input %-4d %s: %s\n", i, a.Name, a.Type)
			}
			fmt.Fprintf(w, "output     %s\nparameters %d (%d bytes)\n", m.OutputType(), m.NumParameters(), m.ParameterBytes())
			return nil
		},
	}
}

// setThreads sets libtorch's intra-op threads to n, or when n is 0 to
// $KILN_NUM_THREADS, else to $OMP_NUM_THREADS (which torchrun and kiln
// train --nproc-per-node set to 1 for each of several local ranks, as
// PyTorch honours it), else to the number of CPUs (some libtorch builds
// start with one thread).
func setThreads(n int) error {
	vars, err := kilnenv.Load(os.Getenv)
	if err != nil {
		return err
	}
	if n == 0 {
		n = vars.NumThreads
	}
	if n == 0 {
		if v, err := strconv.Atoi(os.Getenv("OMP_NUM_THREADS")); err == nil && v > 0 {
			n = v
		}
	}
	if n == 0 {
		n = runtime.NumCPU()
	}
	return core.SetNumThreads(n)
}
