package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"tessera/config"
	"tessera/jobs"
	"tessera/pipeline"
)

func newRunCmd(a *app) *cobra.Command {
	var quiet bool
	cmd := &cobra.Command{
		Use:   "run JOBFILE...",
		Short: "Queue every image of the job files, make them, then exit",
		Long: `Run reads job files (YAML, JSON or TOML), puts one item per image in the
durable queue (queue.url) and works the queue until every item of these
files has finished or failed, writing each image as a PNG with a JSON
sidecar under output.root. Other items in the queue may be worked too.

Items are unique by their content and output path: running the same files
again inserts nothing new, and items whose output and sidecar already exist
and agree are done without work. After Ctrl-C, SIGTERM or a crash, running
the same command again resumes. On Ctrl-C or SIGTERM run takes no new item,
lets running items finish within --grace, puts the rest back in the queue
and exits 0; a second Ctrl-C stops at once. Items a killed process held are
put back in the queue by the next process that works it (see README).

Exit status is 0 when every item succeeded or a stop was asked for, 1 when
an item failed or a job file was rejected.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return a.run(ctx, stop, args, cmd.OutOrStdout(), cmd.ErrOrStderr(), quiet)
		},
	}
	f := cmd.Flags()
	f.String("out", "", "output root directory (config output.root)")
	f.Int("workers", 0, "items worked at once (config workers)")
	f.IntVar(&a.batch, "batch", 0, "most tiles per model Run, 0 = auto (per-stage batch in the job file wins)")
	f.BoolVarP(&quiet, "quiet", "q", false, "print only the summary")
	bindWorkFlags(a, f, "Ctrl-C or SIGTERM")
	bindQueueFlag(a, f)
	a.flags = append(a.flags,
		config.Flag{Key: "output.root", Flag: f.Lookup("out")},
		config.Flag{Key: "workers", Flag: f.Lookup("workers")},
	)
	return cmd
}

type itemOutcome struct {
	elsewhere bool // made by another process working the same queue
	job       string
	item      pipeline.Item
	err       error
	skipped   bool
	seconds   float64
}

// run queues the items of files and works the queue until they end. stop
// restores the default signal handling, so that a second Ctrl-C kills.
func (a *app) run(ctx context.Context, stop func(), files []string, stdout, stderr io.Writer, quiet bool) error {
	cfg := a.cfg
	start := time.Now()
	loaded, badFiles := a.loadJobFiles(files, stderr)
	wo, err := a.prepareOutput()
	if err != nil {
		return err
	}
	var eng *pipeline.Engine
	var prog *progress
	var q *jobs.Queue // set below, before any item runs
	runner := func(ctx context.Context, args jobs.ItemArgs) (err error) {
		prog.start(args.Item)
		defer func() { prog.finish(args.Item, err, stopped(q, err)) }()
		return jobs.MakeItem(ctx, eng, args, prog.step, wo)
	}
	q, err = a.openQueue(context.WithoutCancel(ctx), runner)
	if err != nil {
		return err
	}
	defer q.Close()

	var outcomes []itemOutcome
	var waiting []jobs.Enqueued
	for _, j := range loaded {
		res, err := q.Enqueue(context.WithoutCancel(ctx), j)
		var verr *jobs.ValidationError
		if errors.As(err, &verr) {
			fmt.Fprintf(stderr, "tessera: %v\n", err) // this file's fault; the others go on
			badFiles = append(badFiles, j.Path)
			continue
		}
		if err != nil {
			return err
		}
		for _, e := range res {
			if e.Duplicate && e.State == "completed" {
				outcomes = append(outcomes, itemOutcome{job: j.Name, item: e.Item, skipped: true})
				continue
			}
			waiting = append(waiting, e)
		}
	}
	if len(waiting) == 0 {
		if len(outcomes) > 0 {
			fmt.Fprintf(stdout, "nothing to do: all %d item(s) were already done\n", len(outcomes))
		}
		return summarize(stdout, outcomes, badFiles, 0, time.Since(start), pipeline.Stats{}, cfg.Output.Root, false)
	}

	eng, closeEngine, err := a.newEngine()
	if err != nil {
		return err
	}
	defer closeEngine()
	prog = newProgress(stderr, len(waiting), quiet)
	if prog.tty {
		a.logs.set(prog) // log lines above the bar, not through it
		defer a.logs.set(stderr)
	}
	if err := q.Start(ctx); err != nil {
		return err
	}

	ids := jobs.IDs(waiting)
	interrupted := false
	infos, err := waitForItems(ctx, q, ids)
	if err != nil && ctx.Err() == nil {
		q.Stop(context.Background(), cfg.Queue.Grace)
		prog.close()
		return err
	}
	if ctx.Err() != nil {
		interrupted = true
		stop() // a second Ctrl-C now kills; the next process reclaims its items
		prog.close()
		fmt.Fprintf(stderr, "stopping: no new items; running items may take %s to finish (Ctrl-C again to stop at once)\n", cfg.Queue.Grace)
	}
	if err := q.Stop(context.Background(), cfg.Queue.Grace); err != nil {
		a.logger.Warn("stop the queue", "err", err)
	}
	prog.close()
	if infos, err = q.Jobs(context.Background(), ids); err != nil {
		return err
	}
	remaining := 0
	for i, j := range infos {
		o := itemOutcome{job: j.Job, item: waiting[i].Item, skipped: j.Skipped, seconds: j.Seconds, elsewhere: j.Worker != q.ID()}
		switch {
		case !j.Final():
			remaining++
			continue
		case j.Failed():
			o.err = fmt.Errorf("%s: %s", j.State, j.Error)
		}
		outcomes = append(outcomes, o)
	}
	if remaining > 0 {
		fmt.Fprintf(stdout, "%d item(s) remain queued; run the same command again (or any tessera run on this queue) to finish them\n", remaining)
	}
	return summarize(stdout, outcomes, badFiles, remaining, time.Since(start), eng.Stats(), cfg.Output.Root, interrupted)
}

// waitForItems polls the queue until every job of ids is final, or ctx ends.
func waitForItems(ctx context.Context, q *jobs.Queue, ids []int64) ([]jobs.JobInfo, error) {
	t := time.NewTicker(150 * time.Millisecond)
	defer t.Stop()
	for {
		infos, err := q.Jobs(context.WithoutCancel(ctx), ids)
		if err != nil {
			return nil, err
		}
		final := 0
		for _, j := range infos {
			if j.Final() {
				final++
			}
		}
		if final == len(infos) {
			return infos, nil
		}
		select {
		case <-ctx.Done():
			return infos, nil
		case <-t.C:
		}
	}
}

// summarize prints the run's outcome. remaining items are still queued
// (after a stop); a stop that was asked for is not a failure.
func summarize(w io.Writer, outcomes []itemOutcome, badFiles []string, remaining int, wall time.Duration, st pipeline.Stats, root string, interrupted bool) error {
	var done, skipped, failed, elsewhere int
	var failures []string
	for _, o := range outcomes {
		switch {
		case o.err != nil:
			failed++
			failures = append(failures, fmt.Sprintf("  %s item %d (seed %d) -> %s: %v", o.job, o.item.Index, o.item.Seed, o.item.Output, o.err))
		case o.skipped:
			skipped++
		case o.elsewhere:
			elsewhere++
		default:
			done++
		}
	}
	fmt.Fprintf(w, "%d images made, %d already done, %d failed", done, skipped, failed)
	if elsewhere > 0 {
		fmt.Fprintf(w, ", %d made by other workers", elsewhere)
	}
	if remaining > 0 {
		fmt.Fprintf(w, ", %d remain queued", remaining)
	}
	fmt.Fprintf(w, " in %s (model busy %.1fs, %d tile rows)\n", wall.Round(100*time.Millisecond), st.BusySeconds, st.Rows)
	if done+skipped+elsewhere > 0 {
		abs, _ := filepath.Abs(root)
		fmt.Fprintf(w, "images are under %s\n", abs)
	}
	for _, f := range failures {
		fmt.Fprintln(w, f)
	}
	if len(badFiles) > 0 {
		fmt.Fprintf(w, "job files with errors: %s\n", strings.Join(badFiles, ", "))
	}
	switch {
	case failed > 0 || len(badFiles) > 0:
		return fail(1, "%d item(s) failed, %d job file(s) rejected", failed, len(badFiles))
	case remaining > 0 && !interrupted:
		return fail(1, "%d item(s) did not finish", remaining)
	case interrupted:
		fmt.Fprintln(w, "stopped on request; run the same command again to resume")
	}
	return nil
}
