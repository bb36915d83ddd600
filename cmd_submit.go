package main

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"tessera/config"
	"tessera/jobs"
)

func newSubmitCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "submit JOBFILE...",
		Short: "Put the items of job files in the queue without working them",
		Long: `Submit checks job files and inserts one queue item per image; tessera run or
tessera serve on the same queue (queue.url) works them. Items already in the
queue, waiting, running or done, are not inserted again. Exit status is 1
when a job file was rejected (the other files are still submitted).`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.submit(cmd.Context(), args, cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	f := cmd.Flags()
	f.String("out", "", "output root directory (config output.root)")
	bindQueueFlag(a, f)
	a.flags = append(a.flags, config.Flag{Key: "output.root", Flag: f.Lookup("out")})
	return cmd
}

func (a *app) submit(ctx context.Context, files []string, stdout, stderr io.Writer) error {
	loaded, bad := a.loadJobFiles(files, stderr)
	q, err := a.openQueue(ctx, nil)
	if err != nil {
		return err
	}
	defer q.Close()
	for _, j := range loaded {
		res, err := q.Enqueue(ctx, j)
		var verr *jobs.ValidationError
		if errors.As(err, &verr) {
			fmt.Fprintf(stderr, "tessera: %v\n", err) // this file's fault; the others go on
			bad = append(bad, j.Path)
			continue
		}
		if err != nil {
			return err
		}
		var added, queued, done int
		for _, e := range res {
			switch {
			case !e.Duplicate:
				added++
			case e.State == "completed":
				done++
			default:
				queued++
			}
		}
		fmt.Fprintf(stdout, "%s: %d item(s) added, %d already queued, %d already done\n", j.Path, added, queued, done)
		if added == 0 && queued == 0 {
			fmt.Fprintf(stdout, "%s: nothing to do, every item is already done\n", j.Path)
		}
	}
	if len(bad) > 0 {
		return fail(1, "%d job file(s) rejected", len(bad))
	}
	return nil
}
