package serving

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/internal/testkit"
	"github.com/kilnml/kiln/registry"
	"github.com/kilnml/kiln/serving/auth"
)

// registeredPackage copies a test package (v1-float or v1-int8) under a
// new name, so that each copy is its own artifact.
func registeredPackage(t *testing.T, src, name string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), name)
	_, err := modelpkg.Copy(filepath.Join(testkit.Root(), "core", "modelpkg", "testdata", src), dst)
	require.NoError(t, err)
	man, err := modelpkg.Read(dst)
	require.NoError(t, err)
	man.Name = name
	require.NoError(t, modelpkg.WriteManifest(dst, man))
	return dst
}

// TestRegistryOverHTTP: kiln serve --registry serves the alias's version
// and the registry's REST API under /v2/registry (Control calls): models,
// versions, a compare-and-swap move that the server then follows, 409 for
// a lost swap, 400 for a bad body, 404 for unknown names, 401 without the
// token.
func TestRegistryOverHTTP(t *testing.T) {
	ctx := context.Background()
	db := filepath.Join(t.TempDir(), "registry.db")
	reg, err := registry.Open(ctx, db, registry.Options{})
	require.NoError(t, err)
	for i, src := range []string{"v1-float", "v1-int8"} {
		_, err := reg.RegisterVersion(ctx, "m", registeredPackage(t, src, fmt.Sprint("p", i)), registry.RegisterOptions{Actor: "test"})
		require.NoError(t, err)
	}
	_, err = reg.CompareAndSwap(ctx, registry.Move{Model: "m", Alias: "production", To: 1, Actor: "test"})
	require.NoError(t, err)
	reg.Close()

	root := t.TempDir()
	cfg := testConfig(root, Config{Auth: auth.Config{Token: testToken}})
	cfg.HTTPPort, cfg.Registry, cfg.RegistryPollInterval = 0, db, 20*time.Millisecond
	srv := serve(t, cfg)
	base := "http://" + srv.HTTPAddr().String()
	authz := map[string]string{"Authorization": "Bearer " + testToken}
	infer := func() string {
		r := do(t, nil, "POST", base+"/v2/models/m/infer",
			[]byte(`{"inputs":[{"name":"a","datatype":"FP32","shape":[1,1],"data":[1]},{"name":"b","datatype":"FP32","shape":[1,1],"data":[2]},{"name":"colour","datatype":"BYTES","shape":[1,1],"data":["blue"]}]}`), nil)
		require.Equal(t, 200, r.code, string(r.body))
		return r.json(t)["model_version"].(string)
	}
	assert.Equal(t, "1", infer(), "the alias's version serves from the start")

	requireHTTPError(t, do(t, nil, "GET", base+"/v2/registry/models", nil, nil), 401, "bearer token")
	r := do(t, nil, "GET", base+"/v2/registry/models", nil, authz)
	require.Equal(t, 200, r.code, string(r.body))
	var models struct{ Models []registry.Model }
	require.NoError(t, json.Unmarshal(r.body, &models))
	require.Len(t, models.Models, 1)
	assert.Equal(t, map[string]int{"production": 1}, models.Models[0].Aliases)

	r = do(t, nil, "GET", base+"/v2/registry/models/m", nil, authz)
	require.Equal(t, 200, r.code, string(r.body))
	var model struct{ Versions []registry.Version }
	require.NoError(t, json.Unmarshal(r.body, &model))
	require.Len(t, model.Versions, 2)
	r = do(t, nil, "GET", base+"/v2/registry/models/m/versions/2", nil, authz)
	require.Equal(t, 200, r.code, string(r.body))
	for _, v := range model.Versions {
		if v.Version == 2 {
			assert.Equal(t, v.Digest, r.json(t)["version"].(map[string]any)["digest"])
		}
	}
	requireHTTPError(t, do(t, nil, "GET", base+"/v2/registry/models/nope", nil, authz), 404, "nope")
	requireHTTPError(t, do(t, nil, "GET", base+"/v2/registry/models/m/versions/9", nil, authz), 404)
	requireHTTPError(t, do(t, nil, "GET", base+"/v2/registry/models/m/versions/x", nil, authz), 400)

	move := func(body string) httpResult {
		return do(t, nil, "POST", base+"/v2/registry/models/m/aliases/production", []byte(body), authz)
	}
	requireHTTPError(t, move(`{"version": "2"}`), 400, "alias move")
	requireHTTPError(t, move(`{"version": 2, "expectd": 1}`), 400, "unknown field")
	requireHTTPError(t, move(`{"version": 2, "expected": 2}`), 409, "moved by someone else")
	r = move(`{"version": 2, "expected": 1, "reason": "better on holdout"}`)
	require.Equal(t, 200, r.code, string(r.body))
	ev := r.json(t)
	assert.EqualValues(t, 1, ev["from"])
	assert.EqualValues(t, 2, ev["to"])
	assert.Equal(t, "http:127.0.0.1", ev["actor"])
	requireHTTPError(t, move(`{"version": 2, "expected": 1}`), 409)

	deadline := time.Now().Add(30 * time.Second)
	for infer() != "2" {
		require.True(t, time.Now().Before(deadline), "the server never served version 2")
		time.Sleep(20 * time.Millisecond)
	}
	r = do(t, nil, "GET", base+"/v2/registry/serving", nil, authz)
	require.Equal(t, 200, r.code, string(r.body))
	serving := r.json(t)["models"].([]any)[0].(map[string]any)
	assert.EqualValues(t, 2, serving["serving"])
	assert.EqualValues(t, 1, serving["previous"], "kept for the rollback grace period")

	r = do(t, nil, "GET", base+"/v2/registry/models/m/aliases/production/history", nil, authz)
	require.Equal(t, 200, r.code, string(r.body))
	assert.Len(t, r.json(t)["events"], 2)
	r = do(t, nil, "GET", base+"/v2/registry/runs?limit=5", nil, authz)
	require.Equal(t, 200, r.code, string(r.body))
	requireHTTPError(t, do(t, nil, "GET", base+"/v2/registry/runs?limit=0", nil, authz), 400)
}
