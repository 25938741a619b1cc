package kilnenv

import (
	"path/filepath"
	"testing"
)

func TestLoad(t *testing.T) {
	env := map[string]string{NumThreads: "3", AuthToken: "t0123456789abcdef", AuthTokenFile: "/run/tok"}
	v, err := Load(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	if v != (Vars{NumThreads: 3, AuthToken: "t0123456789abcdef", AuthTokenFile: "/run/tok"}) {
		t.Fatalf("got %+v", v)
	}
	env[Home], env[Registry], env[RegistryKey], env[RegistryKeyFile] = "/srv/kiln", "postgres://h/db", "k", "/run/key"
	v, err = Load(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	if d, err := v.DataDir(); err != nil || d != "/srv/kiln" || v.Registry != "postgres://h/db" || v.RegistryKey != "k" || v.RegistryKeyFile != "/run/key" {
		t.Fatalf("got %+v, data dir %q, %v", v, d, err)
	}
	v.Home = ""
	if d, err := v.DataDir(); err != nil || filepath.Base(d) != ".kiln" {
		t.Fatalf("got %+v", v)
	}
	if v, err := Load(func(string) string { return "" }); err != nil || v != (Vars{}) {
		t.Fatalf("unset: %+v, %v", v, err)
	}
	for _, bad := range []string{"0", "-2", "four"} {
		if _, err := Load(func(k string) string {
			if k == NumThreads {
				return bad
			}
			return ""
		}); err == nil {
			t.Fatalf("%s=%q accepted", NumThreads, bad)
		}
	}
}

func TestLoadS3PathStyle(t *testing.T) {
	for val, want := range map[string]bool{"true": true, "1": true, "false": false} {
		v, err := Load(func(k string) string {
			if k == S3PathStyle {
				return val
			}
			return ""
		})
		if err != nil || v.S3PathStyle == nil || *v.S3PathStyle != want {
			t.Fatalf("%s=%q: %+v, %v", S3PathStyle, val, v.S3PathStyle, err)
		}
	}
	if _, err := Load(func(k string) string {
		if k == S3PathStyle {
			return "sometimes"
		}
		return ""
	}); err == nil {
		t.Fatalf("%s=sometimes accepted", S3PathStyle)
	}
}

func TestRegistryLocation(t *testing.T) {
	v := Vars{Home: "/srv/kiln"}
	dsn, art, err := v.RegistryLocation("", "")
	if err != nil || dsn != "/srv/kiln/registry.db" || art != "" || v.RegistryConfigured("") {
		t.Fatalf("default: %q %q %v", dsn, art, err)
	}
	v.Registry = "postgres://u@/db?host=/run/pg"
	dsn, art, err = v.RegistryLocation("", "")
	if err != nil || dsn != v.Registry || art != "/srv/kiln/artifacts" || !v.RegistryConfigured("") {
		t.Fatalf("env postgres: %q %q %v", dsn, art, err)
	}
	dsn, art, err = v.RegistryLocation("/tmp/r.db", "")
	if err != nil || dsn != "/tmp/r.db" || art != "" {
		t.Fatalf("explicit sqlite: %q %q %v", dsn, art, err)
	}
	// --registry-artifacts, else KILN_REGISTRY_ARTIFACTS, for either database.
	_, art, err = v.RegistryLocation("", "s3://kiln/flag")
	if err != nil || art != "s3://kiln/flag" {
		t.Fatalf("flag artifacts: %q %v", art, err)
	}
	v.RegistryArtifacts = "s3://kiln/env"
	_, art, err = v.RegistryLocation("", "")
	if err != nil || art != "s3://kiln/env" {
		t.Fatalf("env artifacts, postgres: %q %v", art, err)
	}
	_, art, err = v.RegistryLocation("/tmp/r.db", "")
	if err != nil || art != "s3://kiln/env" {
		t.Fatalf("env artifacts, sqlite: %q %v", art, err)
	}
	got, err := Load(func(k string) string { return map[string]string{RegistryArtifacts: "s3://b/p"}[k] })
	if err != nil || got.RegistryArtifacts != "s3://b/p" {
		t.Fatalf("Load: %+v %v", got, err)
	}
	if !(Vars{}).RegistryConfigured("x.db") {
		t.Fatal("an explicit DSN is a configured registry")
	}
}
