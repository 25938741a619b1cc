package testkit

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"syscall"
	"time"
)

// Process is a server process (a `kiln serve`, say) started by
// StartProcess for a benchmark or a test.
type Process struct {
	Cmd *exec.Cmd
	// Log holds the process's stderr.
	Log  *bytes.Buffer
	done chan error
}

// StartProcess starts cmd with its stdout discarded, its stderr kept in
// Log and SIGKILL sent to it should this process die, then waits up to 2
// minutes for readyURL (a KServe v2 /v2/health/ready) to answer 200 OK.
// If the process exits first, or the time runs out (it is then stopped),
// the error holds its log.
func StartProcess(cmd *exec.Cmd, readyURL string) (*Process, error) {
	p := &Process{Cmd: cmd, Log: new(bytes.Buffer), done: make(chan error, 1)}
	cmd.Stdout, cmd.Stderr = io.Discard, p.Log
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	go func() { p.done <- cmd.Wait() }()
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		if resp, err := http.Get(readyURL); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p, nil
			}
		}
		select {
		case err := <-p.done:
			return nil, fmt.Errorf("%s exited (%v): %s", cmd.Path, err, p.Log)
		case <-time.After(100 * time.Millisecond):
		}
	}
	p.Stop()
	return nil, fmt.Errorf("%s not ready after 2 minutes: %s", cmd.Path, p.Log)
}

// Stop sends SIGTERM and waits up to 30 s for the process to end, then
// kills it.
func (p *Process) Stop() {
	_ = p.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		_ = p.Cmd.Process.Kill()
		<-p.done
	}
}
