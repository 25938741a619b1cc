package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/kilnml/kiln/serving/rollout"
	"github.com/spf13/cobra"
)

// rolloutClient calls a server's /v2/rollouts REST API.
type rolloutClient struct {
	url, token string
	out        io.Writer
	json       bool
}

func newRolloutCmd() *cobra.Command {
	c := &rolloutClient{}
	cmd := &cobra.Command{
		Use:   "rollout",
		Short: "Canary rollouts in a running server: status, start, abort, promote",
		Long: `Drives the rollouts of a running kiln serve over its REST API (/v2/rollouts).

A rollout sends a growing share of a model's unversioned requests to a
candidate version (steps, e.g. 5% → 25% → 50% → 100%, each held for a
window), optionally also runs a share of production's requests on the
candidate as shadow traffic and compares the outputs, and judges every
window: the candidate's error rate may exceed production's by at most
max_error_rate_increase, its p99 and p50 latency be at most max_p99_ratio
and max_p50_ratio times production's, and (from shadow traffic, classifiers) it must predict
production's class on at least min_agreement of the rows. A failed window
rolls back at once (all traffic to production, the verdict and evidence in
the registry); passing the last step promotes the candidate (the registry's
production alias moves by compare-and-swap). A request naming a version is
never split. With --registry the server starts a rollout by itself when a
model's "candidate" alias moves (unless --rollout-manual).

Policy (the server's --rollout-policy file, the model's defaults, or flags of
"kiln rollout start"):

  default:
    steps: [5, 25, 50, 100]        # candidate share per step, percent
    window: 30s                    # how long each step is held and judged
    min_requests: 50               # candidate requests a window needs to decide
    max_error_rate_increase: 0.01  # fraction (one percentage point)
    max_p99_ratio: 2
    max_p50_ratio: 2
    min_agreement: 0.95            # classifiers, from shadow traffic
    shadow: 0.1                    # share of production requests shadowed
    sticky_header: x-user-id       # or sticky_parameter: a request parameter
  models:
    fraud: {window: 2m}`,
	}
	pf := cmd.PersistentFlags()
	pf.StringVar(&c.url, "url", "http://localhost:8000", "the server's HTTP address")
	pf.StringVar(&c.token, "auth-token", "", "bearer token of the server (default $KILN_AUTH_TOKEN)")
	pf.BoolVar(&c.json, "json", false, "print the server's JSON answer")

	status := &cobra.Command{
		Use:   "status [MODEL]",
		Short: "Show the latest rollout of MODEL, or of every model",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c.out = cmd.OutOrStdout()
			if len(args) == 0 {
				var list struct {
					Rollouts []rollout.Status `json:"rollouts"`
				}
				if err := c.call(cmd.Context(), http.MethodGet, "/v2/rollouts", nil, &list); err != nil {
					return err
				}
				return c.printList(list.Rollouts)
			}
			return c.do(cmd.Context(), http.MethodGet, "/v2/rollouts/"+url.PathEscape(args[0]), nil)
		},
	}
	var req rollout.StartRequest
	var steps []float64
	var window time.Duration
	var maxErr, minAgree float64
	start := &cobra.Command{
		Use:   "start MODEL",
		Short: "Start rolling out a candidate version of MODEL (default: the registry's candidate alias)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c.out = cmd.OutOrStdout()
			req.Steps, req.Window = steps, rollout.Duration(window)
			if cmd.Flags().Changed("max-error-rate-increase") {
				req.MaxErrorRateIncrease = &maxErr
			}
			if cmd.Flags().Changed("min-agreement") {
				req.MinAgreement = &minAgree
			}
			if req.Actor == "" {
				req.Actor = "cli:" + os.Getenv("USER")
			}
			return c.do(cmd.Context(), http.MethodPost, "/v2/rollouts/"+url.PathEscape(args[0])+"/start", req)
		},
	}
	sf := start.Flags()
	sf.Int64Var(&req.Candidate, "candidate", 0, "the version to roll out (default: the registry's candidate alias)")
	sf.Float64SliceVar(&steps, "steps", nil, "candidate share per step, percent (default 5,25,50,100)")
	sf.DurationVar(&window, "window", 0, "how long each step is held and judged (default 30s)")
	sf.IntVar(&req.MinRequests, "min-requests", 0, "candidate requests a window needs to decide (default 50)")
	sf.Float64Var(&maxErr, "max-error-rate-increase", 0, "how much higher the candidate's error rate may be, a fraction (default 0.01)")
	sf.Float64Var(&req.MaxP99Ratio, "max-p99-ratio", 0, "how many times production's p99 latency the candidate's may be (default 2)")
	sf.Float64Var(&req.MaxP50Ratio, "max-p50-ratio", 0, "how many times production's median latency the candidate's may be (default 2)")
	sf.Float64Var(&minAgree, "min-agreement", 0, "smallest share of shadow rows on which the candidate predicts production's class (default 0.95)")
	sf.Float64Var(&req.Shadow, "shadow", 0, "share of production's requests also run on the candidate (0 to 1)")
	sf.StringVar(&req.StickyHeader, "sticky-header", "", "header (gRPC metadata key) whose value keeps a client on one version")
	sf.StringVar(&req.StickyParameter, "sticky-parameter", "", "request parameter whose value keeps a client on one version")

	var reason string
	abort := &cobra.Command{
		Use:   "abort MODEL",
		Short: "Send all of MODEL's traffic back to production and end its rollout",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c.out = cmd.OutOrStdout()
			return c.do(cmd.Context(), http.MethodPost, "/v2/rollouts/"+url.PathEscape(args[0])+"/abort", map[string]string{"reason": reason})
		},
	}
	abort.Flags().StringVar(&reason, "reason", "", "why (recorded in the registry)")
	promote := &cobra.Command{
		Use:   "promote MODEL",
		Short: "Promote MODEL's candidate now, skipping the remaining steps",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c.out = cmd.OutOrStdout()
			return c.do(cmd.Context(), http.MethodPost, "/v2/rollouts/"+url.PathEscape(args[0])+"/promote", nil)
		},
	}
	cmd.AddCommand(status, start, abort, promote)
	return cmd
}

// do calls the API and prints the rollout it answers.
func (c *rolloutClient) do(ctx context.Context, method, path string, body any) error {
	var st rollout.Status
	if err := c.call(ctx, method, path, body, &st); err != nil {
		return err
	}
	return c.print(st)
}

func (c *rolloutClient) call(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimRight(c.url, "/")+path, rd)
	if err != nil {
		return &exitError{exitUsage, fmt.Errorf("rollout: --url %q: %w", c.url, err)}
	}
	req.Header.Set("Content-Type", "application/json")
	token := c.token
	if token == "" {
		token = os.Getenv("KILN_AUTH_TOKEN")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("rollout: %w", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("rollout: reading the answer: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		var e struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(b, &e) != nil || e.Error == "" {
			e.Error = strings.TrimSpace(string(b))
		}
		return fmt.Errorf("rollout: %s %s: %s: %s", method, path, resp.Status, e.Error)
	}
	if c.json {
		_, err := c.out.Write(append(b, '\n'))
		return err
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("rollout: the server's answer: %w", err)
	}
	return nil
}

func (c *rolloutClient) printList(list []rollout.Status) error {
	if c.json {
		return nil // printed by call
	}
	tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "MODEL\tPRODUCTION\tCANDIDATE\tSTATE\tSTEP\tWEIGHT\tREASON")
	for _, st := range list {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%d/%d\t%.0f%%\t%s\n", st.Model, st.Production, st.Candidate, st.State,
			st.Step+1, len(st.Steps), 100*st.Weight, st.Reason)
	}
	return tw.Flush()
}

func (c *rolloutClient) print(st rollout.Status) error {
	if c.json {
		return nil // printed by call
	}
	w := c.out
	fmt.Fprintf(w, "model %s: %s, production %d, candidate %d\n", st.Model, st.State, st.Production, st.Candidate)
	fmt.Fprintf(w, "step %d of %d %v%%, candidate weight %.0f%%, shadow %.0f%%, window %s\n",
		st.Step+1, len(st.Steps), st.Steps, 100*st.Weight, 100*st.Shadow, time.Duration(st.Window))
	if st.Reason != "" {
		fmt.Fprintf(w, "reason: %s\n", st.Reason)
	}
	if len(st.History) > 0 || st.Live != nil {
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "WINDOW\tWEIGHT\tVERDICT\tCAND REQ\tCAND ERR\tPROD ERR\tCAND P99 ms\tPROD P99 ms\tAGREEMENT")
		row := func(name string, weight float64, verdict string, p, cd rollout.Window, agree *float64) {
			a := "-"
			if agree != nil {
				a = fmt.Sprintf("%.1f%%", 100**agree)
			}
			fmt.Fprintf(tw, "%s\t%.0f%%\t%s\t%d\t%.2f%%\t%.2f%%\t%.3f\t%.3f\t%s\n", name, 100*weight, verdict,
				cd.Requests, 100*cd.ErrorRate, 100*p.ErrorRate, cd.P99Ms, p.P99Ms, a)
		}
		for i, v := range st.History {
			row(fmt.Sprint(i+1), v.Weight, v.Verdict, v.Production, v.Candidate, v.Agreement)
		}
		if l := st.Live; l != nil {
			row("now", st.Weight, "-", l.Production, l.Candidate, l.Agreement)
		}
		tw.Flush()
	}
	return nil
}
