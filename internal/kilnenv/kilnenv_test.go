package kilnenv

import "testing"

func TestLoad(t *testing.T) {
	env := map[string]string{NumThreads: "3", AuthToken: "t0123456789abcdef", AuthTokenFile: "/run/tok"}
	v, err := Load(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	if v != (Vars{NumThreads: 3, AuthToken: "t0123456789abcdef", AuthTokenFile: "/run/tok"}) {
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
