package validate

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	kubeflowv1 "github.com/kubeflow/training-operator/pkg/apis/kubeflow.org/v1"
	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The checks of TestChart, TestKServe and TestPyTorchJob must be able to
// fail: each one here is given a manifest broken in one place and must
// refuse it, naming what is wrong.

// breakFile writes the file at path, with old replaced by new (once, which
// must be there), into a new directory and returns that directory.
func breakFile(t *testing.T, path, old, new string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	s := string(b)
	require.Contains(t, s, old, "the test's anchor is gone from %s", path)
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, filepath.Base(path)), []byte(strings.Replace(s, old, new, 1)), 0o644))
	return dir
}

// copyChart copies the chart into a new directory with one template
// replaced by content, and returns the chart's directory.
func copyChart(t *testing.T, template, content string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "kiln")
	require.NoError(t, os.CopyFS(dst, os.DirFS(chartDir())))
	require.NoError(t, os.WriteFile(filepath.Join(dst, "templates", template), []byte(content), 0o644))
	return dst
}

func TestHelmRefusesBadValues(t *testing.T) {
	for _, tc := range []struct {
		name string
		set  []string
		want string
	}{
		{"wrong type", []string{"replicaCount=three"}, "replicaCount"},
		{"unknown value", []string{"replicas=3"}, "replicas"},
		{"no repository", []string{"repository.uri="}, "set repository.uri"},
		{"repository twice", []string{"repository.pvc.claimName=models"}, "not both"},
		{"short token", []string{"auth.token=short"}, "auth"},
		{"TLS without a Secret", []string{"tls.enabled=true"}, "tls.existingSecret"},
		{"bad control mode", []string{"repository.modelControlMode=sometimes"}, "modelControlMode"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := helmTemplate(t, chartDir(), nil, tc.set...)
			require.Error(t, err, "helm template accepted %v:\n%s", tc.set, out)
			assert.Contains(t, out, tc.want)
		})
	}
	// A template that does not parse.
	chart := copyChart(t, "pdb.yaml", "{{- if .Values.podDisruptionBudget.enabled }}\napiVersion: policy/v1\n")
	out, err := helmTemplate(t, chart, nil)
	require.Error(t, err, "helm template rendered a broken template:\n%s", out)
	assert.Contains(t, out, "pdb.yaml")
}

func TestKubectlValidateRefusesBrokenManifests(t *testing.T) {
	out, err := helmTemplate(t, chartDir(), valuesFiles(true))
	require.NoError(t, err, out)
	var deployment, hpa string
	for _, o := range splitObjects(t, out) {
		switch o.Kind {
		case "Deployment":
			deployment = string(o.raw)
		case "HorizontalPodAutoscaler":
			hpa = string(o.raw)
		}
	}
	require.NotEmpty(t, deployment)
	require.NotEmpty(t, hpa)
	for _, tc := range []struct {
		name, doc, old, new, want string
	}{
		{"wrong type", deployment, "containerPort: 8000", `containerPort: "eight thousand"`, "containerPort"},
		{"unknown field", deployment, "readinessProbe:", "readinessProbes:", "readinessProbes"},
		// Not "a required field missing": kubectl-validate checks types and
		// unknown fields of built-in kinds, not required ones (the API
		// server's own Go validation does that).
		{"wrong type in the HPA", hpa, "averageUtilization: 70", `averageUtilization: "seventy"`, "averageUtilization"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.Contains(t, tc.doc, tc.old)
			dir := t.TempDir()
			require.NoError(t, os.WriteFile(filepath.Join(dir, "broken.yaml"), []byte(strings.Replace(tc.doc, tc.old, tc.new, 1)), 0o644))
			vout, err := kubectlValidate(t, dir, "")
			require.Error(t, err, "kubectl-validate accepted it:\n%s", vout)
			assert.Contains(t, vout, tc.want)
		})
	}
	t.Run("CRD schema", func(t *testing.T) {
		crds := crdDir(t)
		dir := breakFile(t, filepath.Join(root(), "deploy", "kserve", "cluster-serving-runtime.yaml"),
			"  protocolVersions:\n    - v2\n    - grpc-v2\n", "  protocolVersions: v2\n")
		vout, err := kubectlValidate(t, dir, crds)
		require.Error(t, err, "kubectl-validate accepted a broken ClusterServingRuntime:\n%s", vout)
		assert.Contains(t, vout, "protocolVersions")
		dir = breakFile(t, filepath.Join(root(), "deploy", "kubeflow", "pytorchjob.yaml"), "replicas: 2", `replicas: "two"`)
		vout, err = kubectlValidate(t, dir, crds)
		require.Error(t, err, "kubectl-validate accepted a broken PyTorchJob:\n%s", vout)
		assert.Contains(t, vout, "replicas")
	})
}

func TestKubeScoreRefusesUnsafeWorkloads(t *testing.T) {
	out, err := helmTemplate(t, chartDir(), valuesFiles(true))
	require.NoError(t, err, out)
	var core []object
	for _, o := range splitObjects(t, out) {
		if builtin(o) {
			core = append(core, o)
		}
	}
	for _, tc := range []struct {
		name, old, new, want string
	}{
		{"writable root filesystem", "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false", "writable root filesystem"},
		{"no readiness probe", "readinessProbe:", "x-removed-readinessProbe:", "readiness"},
		{"no memory limit", "memory: 8Gi", "", "memory limit"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var objs []object
			for _, o := range core {
				if o.Kind == "Deployment" {
					require.Contains(t, string(o.raw), tc.old)
					o.raw = []byte(strings.Replace(string(o.raw), tc.old, tc.new, 1))
				}
				objs = append(objs, o)
			}
			sout, err := kubeScore(t, writeObjects(t, objs))
			require.Error(t, err, "kube-score accepted it:\n%s", sout)
			assert.Contains(t, strings.ToLower(sout), strings.ToLower(tc.want))
		})
	}
}

func TestStrictDecodingRefusesUnknownFields(t *testing.T) {
	out, err := helmTemplate(t, chartDir(), valuesFiles(true))
	require.NoError(t, err, out)
	var sm []byte
	for _, o := range splitObjects(t, out) {
		if o.Kind == "ServiceMonitor" {
			sm = o.raw
		}
	}
	require.NotEmpty(t, sm)
	broken := strings.Replace(string(sm), "endpoints:", "endpoint:", 1)
	err = strictDecode([]byte(broken), new(monitoringv1.ServiceMonitor))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "endpoint")

	b, err := os.ReadFile(filepath.Join(root(), "deploy", "kubeflow", "pytorchjob.yaml"))
	require.NoError(t, err)
	broken = strings.Replace(string(b), "restartPolicy: OnFailure", "restartPolicy: [OnFailure]", 1)
	require.Error(t, strictDecode([]byte(broken), new(kubeflowv1.PyTorchJob)))
}
