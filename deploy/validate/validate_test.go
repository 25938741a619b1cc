// Package validate checks Kiln's deployment manifests offline, the way a
// cluster's API server and a reviewer would: the Helm chart rendered with
// `helm template` (default and production values), every rendered object
// and every file under deploy/kserve and deploy/kubeflow validated against
// Kubernetes' OpenAPI schemas with kubectl-validate (schemas embedded in
// the tool, no cluster), custom resources against their CRD schemas
// (KServe, Kubeflow) or by strict decoding into their Go API types
// (Prometheus Operator's ServiceMonitor), and the workloads linted with
// kube-score. helm, kubectl-validate and kube-score are pinned Go tool
// dependencies (deploy/tools/*/go.mod) that scripts/install-deps builds into
// build/tools; $KILN_TOOLS names another directory.
//
// It is a module of its own so that Kiln's main module does not carry the
// Kubernetes, Kubeflow and Prometheus Operator API modules.
package validate

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	kubeflowv1 "github.com/kubeflow/training-operator/pkg/apis/kubeflow.org/v1"
	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"sigs.k8s.io/yaml"
)

// kubeVersion is the Kubernetes version whose built-in schemas
// kubectl-validate checks against.
const kubeVersion = "1.30"

// root is the repository's root directory.
func root() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

func chartDir() string { return filepath.Join(root(), "deploy", "helm", "kiln") }

// tool returns the path of a tool scripts/install-deps builds.
func tool(t testing.TB, name string) string {
	t.Helper()
	dir := os.Getenv("KILN_TOOLS")
	if dir == "" {
		dir = filepath.Join(root(), "build", "tools")
	}
	p := filepath.Join(dir, name)
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("%s not built (%v): run scripts/install-deps, which builds the pinned deploy/tools into build/tools", name, err)
	}
	return p
}

// run runs a tool and returns its combined output and its error (an
// *exec.ExitError when it ran and failed).
func run(t testing.TB, name string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(tool(t, name), args...)
	cmd.Env = append(os.Environ(), "HOME="+t.TempDir(), "HELM_CACHE_HOME="+t.TempDir(),
		"HELM_CONFIG_HOME="+t.TempDir(), "HELM_DATA_HOME="+t.TempDir())
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// helmTemplate renders the chart with the given values files and --set
// arguments.
func helmTemplate(t testing.TB, chart string, valuesFiles []string, set ...string) (string, error) {
	t.Helper()
	args := []string{"template", "kiln", chart, "--namespace", "kiln"}
	for _, f := range valuesFiles {
		args = append(args, "--values", f)
	}
	for _, s := range set {
		args = append(args, "--set", s)
	}
	return run(t, "helm", args...)
}

// object is one manifest of a multi-document YAML stream.
type object struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name string `json:"name"`
	} `json:"metadata"`
	raw []byte
}

// splitObjects splits a YAML stream into its non-empty documents.
func splitObjects(t testing.TB, stream string) []object {
	t.Helper()
	var objs []object
	for _, doc := range strings.Split("\n"+stream, "\n---") {
		doc = strings.TrimSpace(doc)
		if doc == "" || isComment(doc) {
			continue
		}
		var o object
		require.NoError(t, yaml.Unmarshal([]byte(doc), &o), "document:\n%s", doc)
		require.NotEmpty(t, o.Kind, "a document without kind:\n%s", doc)
		o.raw = []byte(doc + "\n")
		objs = append(objs, o)
	}
	return objs
}

func isComment(doc string) bool {
	for _, l := range strings.Split(doc, "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			return false
		}
	}
	return true
}

// builtin reports whether o is a Kubernetes built-in kind (kubectl-validate
// has its schema embedded).
func builtin(o object) bool {
	group, _, found := strings.Cut(o.APIVersion, "/")
	if !found { // "v1": the core group
		return true
	}
	return !strings.Contains(group, ".") || strings.HasSuffix(group, ".k8s.io")
}

// writeObjects writes objs into a new directory, one file each, and
// returns the directory.
func writeObjects(t testing.TB, objs []object) string {
	t.Helper()
	dir := t.TempDir()
	for i, o := range objs {
		name := fmt.Sprintf("%02d-%s-%s.yaml", i, strings.ToLower(o.Kind), o.Metadata.Name)
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), o.raw, 0o644))
	}
	return dir
}

// crdDir returns a directory holding the CRDs of the custom resources in
// deploy/: KServe's (testdata/crds, gzipped) and Kubeflow's PyTorchJob (from
// the pinned training-operator module).
func crdDir(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	gz, err := filepath.Glob("testdata/crds/*.yaml.gz")
	require.NoError(t, err)
	require.Len(t, gz, 3)
	for _, f := range gz {
		in, err := os.Open(f)
		require.NoError(t, err)
		zr, err := gzip.NewReader(in)
		require.NoError(t, err)
		b, err := io.ReadAll(zr)
		require.NoError(t, err)
		in.Close()
		require.NoError(t, os.WriteFile(filepath.Join(dir, strings.TrimSuffix(filepath.Base(f), ".gz")), b, 0o644))
	}
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/kubeflow/training-operator").Output()
	require.NoError(t, err, "go list -m github.com/kubeflow/training-operator")
	b, err := os.ReadFile(filepath.Join(strings.TrimSpace(string(out)), "manifests", "base", "crds", "kubeflow.org_pytorchjobs.yaml"))
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "kubeflow.org_pytorchjobs.yaml"), b, 0o644))
	return dir
}

// kubectlValidate validates every file under dir against the built-in
// schemas of kubeVersion and, with crds, against the CRDs in that directory.
func kubectlValidate(t testing.TB, dir, crds string) (string, error) {
	t.Helper()
	args := []string{dir, "--version", kubeVersion}
	if crds != "" {
		args = append(args, "--local-crds", crds)
	}
	return run(t, "kubectl-validate", args...)
}

// kubeScoreIgnored are the kube-score checks the chart does not follow, and why.
var kubeScoreIgnored = []string{
	// The image tag is the chart's appVersion, a pinned tag; a digest is
	// set by the installer (image.tag: "0.1.0@sha256:...").
	"container-image-pull-policy",
	// Ingress from other namespaces is the installer's choice
	// (networkPolicy.enabled, on in values-production.yaml); egress goes to
	// S3, the registry's database and DNS, which differ per cluster.
	"pod-networkpolicy",
}

// kubeScore lints the workload objects in dir (Deployment, Service, HPA,
// PDB, NetworkPolicy); it fails on any CRITICAL finding.
func kubeScore(t testing.TB, dir string) (string, error) {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	require.NoError(t, err)
	require.NotEmpty(t, files)
	args := []string{"score", "--output-format", "ci", "--exit-one-on-warning"}
	for _, c := range kubeScoreIgnored {
		args = append(args, "--ignore-test", c)
	}
	return run(t, "kube-score", append(args, files...)...)
}

// strictDecode decodes a custom resource into its Go API type, refusing
// unknown fields and wrong types.
func strictDecode(raw []byte, into any) error {
	j, err := yaml.YAMLToJSON(raw)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(j))
	dec.DisallowUnknownFields()
	return dec.Decode(into)
}

func valuesFiles(production bool) []string {
	if !production {
		return nil
	}
	return []string{filepath.Join(chartDir(), "values-production.yaml")}
}

// TestChart renders the chart with default and production values and
// validates every object: built-in kinds against Kubernetes' schemas, the
// ServiceMonitor by strict decoding, the workloads with kube-score.
func TestChart(t *testing.T) {
	for _, tc := range []struct {
		name       string
		production bool
		wantKinds  []string
	}{
		{"default", false, []string{"ServiceAccount", "Service", "Deployment", "PodDisruptionBudget"}},
		{"production", true, []string{"ServiceAccount", "Service", "Deployment", "PodDisruptionBudget",
			"HorizontalPodAutoscaler", "ServiceMonitor", "NetworkPolicy"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := helmTemplate(t, chartDir(), valuesFiles(tc.production))
			require.NoError(t, err, "helm template: %s", out)
			objs := splitObjects(t, out)
			var kinds []string
			var core []object
			for _, o := range objs {
				kinds = append(kinds, o.Kind)
				if builtin(o) {
					core = append(core, o)
					continue
				}
				require.Equal(t, "ServiceMonitor", o.Kind, "a custom resource this test cannot check")
				var sm monitoringv1.ServiceMonitor
				require.NoError(t, strictDecode(o.raw, &sm), "ServiceMonitor:\n%s", o.raw)
				require.Len(t, sm.Spec.Endpoints, 1)
				assert.Equal(t, "metrics", sm.Spec.Endpoints[0].Port)
				assert.Equal(t, "/metrics", sm.Spec.Endpoints[0].Path)
			}
			assert.ElementsMatch(t, tc.wantKinds, kinds)
			dir := writeObjects(t, core)
			vout, err := kubectlValidate(t, dir, "")
			require.NoError(t, err, "kubectl-validate:\n%s", vout)
			sout, err := kubeScore(t, dir)
			require.NoError(t, err, "kube-score:\n%s", sout)
			t.Logf("%d objects; kube-score:\n%s", len(objs), sout)
		})
	}
}

// TestKServe validates the ClusterServingRuntime and the InferenceService
// example (and its Secret and ServiceAccount) against KServe's CRDs and
// Kubernetes' schemas.
func TestKServe(t *testing.T) {
	dir := filepath.Join(root(), "deploy", "kserve")
	out, err := kubectlValidate(t, dir, crdDir(t))
	require.NoError(t, err, "kubectl-validate:\n%s", out)
	t.Logf("kubectl-validate:\n%s", out)

	b, err := os.ReadFile(filepath.Join(dir, "cluster-serving-runtime.yaml"))
	require.NoError(t, err)
	var rt struct {
		Spec struct {
			ProtocolVersions []string `json:"protocolVersions"`
			Containers       []struct {
				Name string   `json:"name"`
				Args []string `json:"args"`
			} `json:"containers"`
		} `json:"spec"`
	}
	require.NoError(t, yaml.Unmarshal(b, &rt))
	assert.ElementsMatch(t, []string{"v2", "grpc-v2"}, rt.Spec.ProtocolVersions)
	require.Len(t, rt.Spec.Containers, 1)
	assert.Equal(t, "kserve-container", rt.Spec.Containers[0].Name, "KServe's container name")
	assert.Contains(t, rt.Spec.Containers[0].Args, "--model-repository=/mnt/models", "KServe's model path")
}

// TestPyTorchJob validates the PyTorchJob against the training operator's
// CRD and strictly decodes it into the operator's Go type.
func TestPyTorchJob(t *testing.T) {
	dir := filepath.Join(root(), "deploy", "kubeflow")
	out, err := kubectlValidate(t, dir, crdDir(t))
	require.NoError(t, err, "kubectl-validate:\n%s", out)

	b, err := os.ReadFile(filepath.Join(dir, "pytorchjob.yaml"))
	require.NoError(t, err)
	var job kubeflowv1.PyTorchJob
	require.NoError(t, strictDecode(b, &job))
	require.Contains(t, job.Spec.PyTorchReplicaSpecs, kubeflowv1.PyTorchJobReplicaTypeMaster)
	for rtype, spec := range job.Spec.PyTorchReplicaSpecs {
		c := spec.Template.Spec.Containers
		require.Len(t, c, 1, rtype)
		assert.Equal(t, kubeflowv1.PyTorchJobDefaultContainerName, c[0].Name, "%s: the operator injects MASTER_ADDR, RANK, ... into this container only", rtype)
		require.NotEmpty(t, c[0].Args, rtype)
		assert.Equal(t, "train", c[0].Args[0], rtype)
		for _, a := range c[0].Args {
			assert.NotContains(t, a, "--nproc-per-node", "%s: the operator launches the ranks", rtype)
		}
	}
}
