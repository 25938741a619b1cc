package main

import (
	"bytes"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.yaml.in/yaml/v3"

	"github.com/kilnml/kiln/internal/testkit"
)

// The deployment manifests (deploy/) start kiln with arguments of their
// own; deploy/validate checks them against Kubernetes' schemas, this test
// against kiln itself: every argument list parses with the command it
// names, so that a renamed or removed flag breaks the test, not a cluster.

// manifestContainer is the part of a pod template this test reads.
type manifestContainer struct {
	Name string   `yaml:"name"`
	Args []string `yaml:"args"`
}

// containersOf returns the containers of every Deployment, ClusterServingRuntime
// and PyTorchJob replica in a YAML stream.
func containersOf(t *testing.T, stream []byte) map[string][]manifestContainer {
	t.Helper()
	out := map[string][]manifestContainer{}
	dec := yaml.NewDecoder(bytes.NewReader(stream))
	for {
		var doc struct {
			Kind string `yaml:"kind"`
			Spec struct {
				Containers []manifestContainer `yaml:"containers"` // ClusterServingRuntime
				Template   struct {
					Spec struct {
						Containers []manifestContainer `yaml:"containers"`
					} `yaml:"spec"`
				} `yaml:"template"` // Deployment
				PyTorchReplicaSpecs map[string]struct {
					Template struct {
						Spec struct {
							Containers []manifestContainer `yaml:"containers"`
						} `yaml:"spec"`
					} `yaml:"template"`
				} `yaml:"pytorchReplicaSpecs"`
			} `yaml:"spec"`
		}
		err := dec.Decode(&doc)
		if errors.Is(err, io.EOF) {
			return out
		}
		require.NoError(t, err)
		switch doc.Kind {
		case "Deployment":
			out["Deployment"] = append(out["Deployment"], doc.Spec.Template.Spec.Containers...)
		case "ClusterServingRuntime":
			out[doc.Kind] = append(out[doc.Kind], doc.Spec.Containers...)
		case "PyTorchJob":
			for rt, s := range doc.Spec.PyTorchReplicaSpecs {
				out["PyTorchJob "+rt] = append(out["PyTorchJob "+rt], s.Template.Spec.Containers...)
			}
		}
	}
}

// parseKilnArgs parses args (a subcommand and its flags) with kiln's own
// command tree (newRoot), the root's persistent flags (--threads) included.
func parseKilnArgs(args []string) error {
	if len(args) == 0 {
		return errors.New("no arguments")
	}
	cmd, rest, err := newRoot().Find(args)
	if err != nil {
		return err
	}
	if cmd.Name() != args[0] || (args[0] != "serve" && args[0] != "train") {
		return errors.New("not a kiln serve or train command: " + args[0])
	}
	if err := cmd.ParseFlags(rest); err != nil {
		return err
	}
	if n := cmd.Flags().NArg(); n > 0 {
		return errors.New("positional arguments: " + strings.Join(cmd.Flags().Args(), " "))
	}
	return nil
}

func TestDeployManifestArgs(t *testing.T) {
	helm := filepath.Join(testkit.Root(), "build", "tools", "helm")
	if _, err := os.Stat(helm); err != nil {
		t.Fatalf("helm not built (%v): run scripts/install-deps", err)
	}
	chart := filepath.Join(testkit.Root(), "deploy", "helm", "kiln")
	streams := map[string][]byte{}
	for name, extra := range map[string][]string{
		"chart (default values)": nil,
		"chart (production)":     {"--values", filepath.Join(chart, "values-production.yaml")},
		"chart (PVC, explicit)": {"--set", "repository.uri=", "--set", "repository.pvc.claimName=models",
			"--set", "repository.modelControlMode=explicit", "--set", "repository.loadModels={iris,digits}",
			"--set", "repository.strictModelConfig=true", "--set", "server.threads=2"},
	} {
		cmd := exec.Command(helm, append([]string{"template", "kiln", chart}, extra...)...)
		cmd.Env = append(os.Environ(), "HOME="+t.TempDir())
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "helm template %s: %s", name, out)
		streams[name] = out
	}
	for _, f := range []string{"kserve/cluster-serving-runtime.yaml", "kubeflow/pytorchjob.yaml"} {
		b, err := os.ReadFile(filepath.Join(testkit.Root(), "deploy", f))
		require.NoError(t, err)
		streams[f] = b
	}
	checked := 0
	for name, stream := range streams {
		for kind, cs := range containersOf(t, stream) {
			for _, c := range cs {
				t.Logf("%s, %s, container %s: kiln %s", name, kind, c.Name, strings.Join(c.Args, " "))
				assert.NoError(t, parseKilnArgs(c.Args), "%s, %s, container %s: kiln %v", name, kind, c.Name, c.Args)
				checked++
			}
		}
	}
	assert.Equal(t, 3+1+2, checked, "containers checked: 3 Deployments, 1 runtime, 2 PyTorchJob replica types")
	// The check can fail.
	assert.Error(t, parseKilnArgs([]string{"serve", "--model-repositry=/models"}))
	assert.Error(t, parseKilnArgs([]string{"train", "--nproc-per-node=two"}))
	assert.Error(t, parseKilnArgs([]string{"serve", "--threads=2", "extra"}))
	assert.Error(t, parseKilnArgs([]string{"sreve", "--threads=2"}))
}
