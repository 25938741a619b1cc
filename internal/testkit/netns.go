package testkit

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
)

// NetNS is a Linux network namespace made for one test, joined to the
// test's own namespace by a veth pair: Host is the address of the test's
// end (in the test's namespace), Peer the address of the namespace's end,
// both in one /30. A process started with Command runs inside the
// namespace, so a server the test runs sees it connect from Peer: another
// host, not loopback.
type NetNS struct {
	// Name is the namespace's name under /run/netns (ip netns).
	Name string
	// Host and Peer are the IPv4 addresses of the test's and the
	// namespace's ends of the veth pair.
	Host, Peer netip.Addr

	close func() error
}

var netnsSeq atomic.Uint32

// NewNetNS creates a network namespace and a veth pair with `ip` (iproute2)
// and removes both in t.Cleanup. It needs root (CAP_NET_ADMIN) and the ip
// command: without them the test is skipped, except under CI (CI set in the
// environment), where it fails, so that CI cannot pass by skipping it.
func NewNetNS(t testing.TB) *NetNS {
	t.Helper()
	ns, err := CreateNetNS()
	if err != nil {
		var u errUnavailable
		if !errors.As(err, &u) {
			t.Fatal(err)
		}
		if os.Getenv("CI") != "" {
			t.Fatalf("network namespace test under CI: %s", u.why)
		}
		t.Skipf("network namespaces unavailable: %s", u.why)
	}
	t.Cleanup(func() {
		if err := ns.Close(); err != nil {
			t.Error(err)
		}
	})
	return ns
}

// errUnavailable is CreateNetNS's error when this machine cannot make a
// namespace at all (not root, no ip command, no netns support).
type errUnavailable struct{ why string }

func (e errUnavailable) Error() string { return "network namespaces unavailable: " + e.why }

// CreateNetNS is NewNetNS outside a test (the benchmarks): it creates the
// namespace and its veth pair; Close removes them.
func CreateNetNS() (*NetNS, error) {
	if os.Geteuid() != 0 {
		return nil, errUnavailable{"not root"}
	}
	ipCmd, err := exec.LookPath("ip")
	if err != nil {
		return nil, errUnavailable{"no ip command (iproute2)"}
	}
	// Names are at most 15 bytes (IFNAMSIZ-1) and unique per process and
	// test; the /30 is 10.250.x.y/30, x.y from the same counter.
	n := uint32(os.Getpid())%4096*16 + netnsSeq.Add(1)%16
	ns := &NetNS{Name: fmt.Sprintf("kiln-t%d", n)}
	hostIf, peerIf := fmt.Sprintf("kv%da", n), fmt.Sprintf("kv%db", n)
	base := (n % 16384) * 4
	ns.Host = netip.AddrFrom4([4]byte{10, 250, byte(base >> 8), byte(base&0xff) + 1})
	ns.Peer = ns.Host.Next()

	run := func(args ...string) error {
		out, err := exec.Command(ipCmd, args...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
		}
		return nil
	}
	if err := run("netns", "add", ns.Name); err != nil {
		return nil, errUnavailable{err.Error()}
	}
	ns.close = func() error {
		// Deleting the namespace removes its end of the pair, and with it
		// the test's end.
		if err := run("netns", "delete", ns.Name); err != nil {
			return fmt.Errorf("removing %s: %w", ns.Name, err)
		}
		_ = run("link", "delete", hostIf)
		return nil
	}
	steps := [][]string{
		{"link", "add", hostIf, "type", "veth", "peer", "name", peerIf},
		{"link", "set", peerIf, "netns", ns.Name},
		{"addr", "add", ns.Host.String() + "/30", "dev", hostIf},
		{"link", "set", hostIf, "up"},
		{"-n", ns.Name, "addr", "add", ns.Peer.String() + "/30", "dev", peerIf},
		{"-n", ns.Name, "link", "set", peerIf, "up"},
		{"-n", ns.Name, "link", "set", "lo", "up"},
	}
	for _, s := range steps {
		if err := run(s...); err != nil {
			return nil, errors.Join(err, ns.Close())
		}
	}
	return ns, nil
}

// Close removes the namespace and its veth pair (NewNetNS's t.Cleanup
// does it for a test).
func (ns *NetNS) Close() error {
	if ns.close == nil {
		return nil
	}
	c := ns.close
	ns.close = nil
	return c()
}

// Command returns a command that runs name with args inside the namespace
// (`ip netns exec`).
func (ns *NetNS) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns.Name, name}, args...)...)
}
