package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"tessera/config"
	"tessera/jobs"
	"tessera/models"
	"tessera/onnx"
	"tessera/pipeline"
)

func newRunCmd(a *app) *cobra.Command {
	var quiet bool
	cmd := &cobra.Command{
		Use:   "run JOBFILE...",
		Short: "Make every image of the job files, then exit",
		Long: `Run reads job files (YAML, JSON or TOML), makes every image they describe and
writes each as a PNG with a JSON sidecar under output.root. Outputs that
already exist and match their sidecar are skipped, so running the same files
again resumes where an earlier run stopped. Exit status is 0 only when every
item succeeded.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return a.run(ctx, args, cmd.OutOrStdout(), cmd.ErrOrStderr(), quiet)
		},
	}
	f := cmd.Flags()
	f.String("out", "", "output root directory (config output.root)")
	f.Int("workers", 0, "items worked at once (config workers)")
	f.Int("batch", 0, "most tiles per model Run, 0 = auto (per-stage batch in the job file wins)")
	f.BoolVarP(&quiet, "quiet", "q", false, "print only the summary")
	a.flags = append(a.flags,
		config.Flag{Key: "output.root", Flag: f.Lookup("out")},
		config.Flag{Key: "workers", Flag: f.Lookup("workers")},
	)
	a.batchFlag = f.Lookup("batch")
	return cmd
}

type itemOutcome struct {
	job     string
	item    pipeline.Item
	err     error
	skipped bool
	seconds float64
}

func (a *app) run(ctx context.Context, files []string, stdout, stderr io.Writer, quiet bool) error {
	cfg := a.cfg
	var loaded []*jobs.Job
	var failed []string
	for _, f := range files {
		job, err := jobs.Load(f, cfg)
		if err != nil {
			fmt.Fprintf(stderr, "tessera: %v\n", err)
			failed = append(failed, f)
			continue
		}
		loaded = append(loaded, job)
	}
	if n, err := jobs.RemoveStaleTemps(cfg.Output.Root); err == nil && n > 0 {
		a.logger.Info("removed temp files left by an interrupted run", "count", n, "dir", cfg.Output.Root)
	}
	type work struct {
		job  string
		item pipeline.Item
	}
	var todo []work
	var outcomes []itemOutcome
	for _, j := range loaded {
		for _, it := range j.Items {
			if jobs.Done(it) {
				outcomes = append(outcomes, itemOutcome{job: j.Name, item: it, skipped: true})
				continue
			}
			todo = append(todo, work{j.Name, it})
		}
	}
	env, err := onnx.Open(cfg.Runtime, a.logger)
	if err != nil {
		return err
	}
	defer env.Close()
	batch := 0
	if a.batchFlag != nil && a.batchFlag.Changed {
		batch, _ = strconv.Atoi(a.batchFlag.Value.String())
	}
	eng := pipeline.New(env, models.Resolver{Dirs: cfg.Models.Dirs, AllowPaths: cfg.Models.AllowPaths}, pipeline.Options{Workers: cfg.Workers, Batch: batch, MemoryBudget: cfg.Memory.Budget}, a.logger)
	defer eng.Close()

	prog := newProgress(stderr, len(todo), quiet)
	start := time.Now()
	var mu sync.Mutex
	queue := make(chan work)
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		defer close(queue)
		for _, w := range todo {
			select {
			case queue <- w:
			case <-gctx.Done():
				return nil
			}
		}
		return nil
	})
	for i := 0; i < cfg.Workers; i++ {
		g.Go(func() error {
			for w := range queue {
				t0 := time.Now()
				prog.start(w.item)
				res, err := eng.Generate(gctx, w.item, prog.step)
				if err == nil {
					err = jobs.Write(w.job, w.item, res, version)
				}
				o := itemOutcome{job: w.job, item: w.item, err: err, seconds: time.Since(t0).Seconds()}
				prog.finish(w.item, err)
				mu.Lock()
				outcomes = append(outcomes, o)
				mu.Unlock()
			}
			return nil
		})
	}
	g.Wait()
	prog.close()
	return summarize(stdout, outcomes, failed, len(todo), time.Since(start), eng.Stats(), cfg.Output.Root, ctx.Err() != nil)
}

func summarize(w io.Writer, outcomes []itemOutcome, badFiles []string, todo int, wall time.Duration, st pipeline.Stats, root string, interrupted bool) error {
	var done, skipped, failed int
	var failures []string
	for _, o := range outcomes {
		switch {
		case o.skipped:
			skipped++
		case o.err != nil:
			failed++
			failures = append(failures, fmt.Sprintf("  %s item %d (seed %d) -> %s: %v", o.job, o.item.Index, o.item.Seed, o.item.Output, o.err))
		default:
			done++
		}
	}
	notRun := todo - done - failed
	fmt.Fprintf(w, "%d images made, %d already done, %d failed", done, skipped, failed)
	if notRun > 0 {
		fmt.Fprintf(w, ", %d not started", notRun)
	}
	fmt.Fprintf(w, " in %s (model time %.1fs, %d tile rows)\n", wall.Round(100*time.Millisecond), st.RunSeconds, st.Rows)
	if done+skipped > 0 {
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
	case interrupted:
		return fail(130, "interrupted; run the same command again to resume")
	case failed > 0 || len(badFiles) > 0 || notRun > 0:
		return fail(1, "%d item(s) failed, %d job file(s) rejected", failed+notRun, len(badFiles))
	}
	return nil
}
