package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"time"

	"github.com/riverqueue/river/rivertype"
	"github.com/spf13/cobra"

	"tessera/config"
	"tessera/jobs"
)

func newStatusCmd(a *app) *cobra.Command {
	var asJSON bool
	var last int
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the queue: items per state, running items, last failures",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.status(cmd.Context(), cmd.OutOrStdout(), asJSON, last)
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	cmd.Flags().IntVar(&last, "failures", 10, "how many of the last failures to show")
	bindQueueFlag(a, cmd.Flags())
	return cmd
}

// queueStatus is what status prints.
type queueStatus struct {
	Queue    string         `json:"queue"`
	Counts   map[string]int `json:"counts"`
	Running  []jobs.JobInfo `json:"running"`
	Failures []jobs.JobInfo `json:"failures"`
	Retrying []jobs.JobInfo `json:"retrying"`
}

func (a *app) status(ctx context.Context, w io.Writer, asJSON bool, last int) error {
	q, err := a.openQueue(ctx, nil)
	if err != nil {
		return err
	}
	defer q.Close()
	st := queueStatus{Queue: config.RedactURL(a.cfg.Queue.URL)}
	if st.Counts, err = q.Counts(ctx); err != nil {
		return err
	}
	if st.Running, err = q.List(ctx, rivertype.JobStateRunning); err != nil {
		return err
	}
	if st.Retrying, err = q.List(ctx, rivertype.JobStateRetryable); err != nil {
		return err
	}
	if st.Failures, err = q.List(ctx, rivertype.JobStateCancelled, rivertype.JobStateDiscarded); err != nil {
		return err
	}
	sort.SliceStable(st.Failures, func(i, j int) bool {
		fi, fj := st.Failures[i].FinalizedAt, st.Failures[j].FinalizedAt
		return fi != nil && (fj == nil || fi.After(*fj))
	})
	if len(st.Failures) > last {
		st.Failures = st.Failures[:max(last, 0)]
	}
	if st.Running == nil {
		st.Running = []jobs.JobInfo{}
	}
	if st.Failures == nil {
		st.Failures = []jobs.JobInfo{}
	}
	if st.Retrying == nil {
		st.Retrying = []jobs.JobInfo{}
	}
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	fmt.Fprintf(w, "queue %s\n", st.Queue)
	for _, s := range []string{"available", "scheduled", "retryable", "running", "completed", "cancelled", "discarded", "pending"} {
		fmt.Fprintf(w, "  %-10s %d\n", s, st.Counts[s])
	}
	if len(st.Running) > 0 {
		fmt.Fprintln(w, "running:")
		for _, j := range st.Running {
			since := ""
			if j.AttemptedAt != nil {
				since = time.Since(*j.AttemptedAt).Round(time.Second).String()
			}
			fmt.Fprintf(w, "  job %d  %s item %d (seed %d) -> %s  attempt %d, %s, by %s\n", j.ID, j.Job, j.Item, j.Seed, j.Output, j.Attempt, since, j.Worker)
		}
	}
	if len(st.Retrying) > 0 {
		fmt.Fprintln(w, "waiting to retry:")
		for _, j := range st.Retrying {
			fmt.Fprintf(w, "  job %d  %s item %d -> %s  attempt %d/%d at %s: %s\n", j.ID, j.Job, j.Item, j.Output, j.Attempt, j.MaxAttempts, j.ScheduledAt.Local().Format(time.TimeOnly), j.Error)
		}
	}
	if len(st.Failures) > 0 {
		fmt.Fprintln(w, "last failures:")
		for _, j := range st.Failures {
			fmt.Fprintf(w, "  job %d  %s item %d (seed %d) -> %s  %s: %s\n", j.ID, j.Job, j.Item, j.Seed, j.Output, j.State, j.Error)
		}
	}
	return nil
}
