package registry

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The test binary re-executed as a child process (TestMain runs runChild):
// it opens the registry and moves one alias, as another kiln process would.
const (
	childRole = "KILN_REGISTRY_TEST_CHILD" // cas, hold or done
	childDSN  = "KILN_REGISTRY_TEST_DSN"
	childDir  = "KILN_REGISTRY_TEST_ARTIFACTS"
	childMove = "KILN_REGISTRY_TEST_MOVE" // model alias expected to
	childGo   = "KILN_REGISTRY_TEST_GO"   // a file to wait for before moving
)

// runChild is the child's main: it prints "ready", waits for the go file
// (cas), moves the alias and prints "won" or "conflict"; "hold" stops
// inside the move's transaction just before the commit and prints
// "holding"; "done" prints "done" after the move. hold and done then
// wait to be killed.
func runChild(role string) int {
	ctx := context.Background()
	r, err := Open(ctx, os.Getenv(childDSN), Options{ArtifactDir: os.Getenv(childDir)})
	if err != nil {
		fmt.Println("error:", err)
		return 1
	}
	f := strings.Fields(os.Getenv(childMove))
	expect, _ := strconv.Atoi(f[2])
	to, _ := strconv.Atoi(f[3])
	m := Move{Model: f[0], Alias: f[1], Expected: expect, To: to, Actor: fmt.Sprintf("pid %d", os.Getpid()), Reason: role}
	if role == "hold" {
		r.beforeCommit = func() {
			fmt.Println("holding")
			time.Sleep(time.Hour) // until killed
		}
	}
	fmt.Println("ready")
	if g := os.Getenv(childGo); g != "" {
		for {
			if _, err := os.Stat(g); err == nil {
				break
			}
			time.Sleep(time.Millisecond)
		}
	}
	_, err = r.CompareAndSwap(ctx, m)
	switch {
	case err == nil && role == "done":
		fmt.Println("done")
		time.Sleep(time.Hour) // until killed
	case err == nil:
		fmt.Println("won")
	case errors.Is(err, ErrConflict):
		fmt.Println("conflict")
	default:
		fmt.Println("error:", err)
		return 1
	}
	return 0
}

// child starts the test binary as a child process and returns it with a
// reader of its output lines.
func child(t *testing.T, b backend, role, move, goFile string) (*exec.Cmd, *bufio.Scanner) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childRole+"="+role, childDSN+"="+b.dsn, childDir+"="+b.dir, childMove+"="+move, childGo+"="+goFile)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd, bufio.NewScanner(out)
}

// kill9 kills the child with SIGKILL and checks that it was alive until
// then (it ended by that signal, not by itself).
func kill9(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
	cmd.Wait()
	ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus)
	require.True(t, ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL, "child ended by %v, not by SIGKILL", cmd.ProcessState)
}

// expectLine reads the child's next line and checks it.
func expectLine(t *testing.T, s *bufio.Scanner, want string) {
	t.Helper()
	require.True(t, s.Scan(), "child ended before printing %q: %v", want, s.Err())
	require.Equal(t, want, s.Text())
}

// Two processes move one alias at once from the same version: exactly one
// compare-and-swap wins, and the alias is where the winner put it.
func TestTwoProcessesMoveOneAlias(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		r := b.open(t, Options{})
		for _, n := range []string{"a", "b", "c"} {
			_, err := r.RegisterVersion(ctx, "iris", pkg(t, n), RegisterOptions{})
			require.NoError(t, err)
		}
		_, err := r.CompareAndSwap(ctx, Move{Model: "iris", Alias: "production", To: 1})
		require.NoError(t, err)
		for round := range 3 {
			goFile := fmt.Sprintf("%s/go-%d", t.TempDir(), round)
			cur, err := r.Alias(ctx, "iris", "production")
			require.NoError(t, err)
			targets := []int{cur%3 + 1, (cur+1)%3 + 1} // the two other versions
			var scanners []*bufio.Scanner
			var cmds []*exec.Cmd
			for _, to := range targets {
				cmd, s := child(t, b, "cas", fmt.Sprintf("iris production %d %d", cur, to), goFile)
				expectLine(t, s, "ready")
				cmds, scanners = append(cmds, cmd), append(scanners, s)
			}
			require.NoError(t, os.WriteFile(goFile, nil, 0o644))
			won := -1
			for i, s := range scanners {
				require.True(t, s.Scan())
				switch s.Text() {
				case "won":
					require.Equal(t, -1, won, "round %d: both won", round)
					won = i
				case "conflict":
				default:
					t.Fatalf("round %d: child says %q", round, s.Text())
				}
				require.NoError(t, cmds[i].Wait())
			}
			require.NotEqual(t, -1, won, "round %d: neither won", round)
			now, err := r.Alias(ctx, "iris", "production")
			require.NoError(t, err)
			assert.Equal(t, targets[won], now, "round %d", round)
		}
		hist, err := r.History(ctx, "iris", "production")
		require.NoError(t, err)
		assert.Len(t, hist, 4) // the first set and one move per round
		for i := 1; i < len(hist); i++ {
			assert.Equal(t, hist[i-1].To, hist[i].From, "history is a chain")
		}
	})
}

// A process killed (SIGKILL) during a promotion leaves the alias at the
// old version (killed before the commit) or the new one (after it), and
// the registry usable.
func TestKillDuringPromotion(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		r := b.open(t, Options{})
		for _, n := range []string{"a", "b"} {
			_, err := r.RegisterVersion(ctx, "iris", pkg(t, n), RegisterOptions{})
			require.NoError(t, err)
		}
		_, err := r.CompareAndSwap(ctx, Move{Model: "iris", Alias: "production", To: 1})
		require.NoError(t, err)

		cmd, s := child(t, b, "hold", "iris production 1 2", "")
		expectLine(t, s, "ready")
		expectLine(t, s, "holding") // inside the transaction, before the commit
		kill9(t, cmd)
		v, err := r.Alias(ctx, "iris", "production")
		require.NoError(t, err)
		assert.Equal(t, 1, v, "killed before the commit: the old version")
		hist, err := r.History(ctx, "iris", "production")
		require.NoError(t, err)
		assert.Len(t, hist, 1, "no event of the move that did not happen")

		cmd, s = child(t, b, "done", "iris production 1 2", "")
		expectLine(t, s, "ready")
		expectLine(t, s, "done")
		kill9(t, cmd)
		v, err = r.Alias(ctx, "iris", "production")
		require.NoError(t, err)
		assert.Equal(t, 2, v, "killed after the commit: the new version")

		// Nothing is left locked: this process moves it back.
		_, err = r.CompareAndSwap(ctx, Move{Model: "iris", Alias: "production", Expected: 2, To: 1, Reason: "rollback"})
		require.NoError(t, err)
		hist, err = r.History(ctx, "iris", "production")
		require.NoError(t, err)
		assert.Len(t, hist, 3)
	})
}
