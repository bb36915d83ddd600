package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"tessera/config"
	"tessera/jobs"
	"tessera/metrics"
	"tessera/pipeline"
)

func newServeCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Work the queue, watch directories, fire schedules and serve /metrics",
		Long: `Serve works the durable queue (queue.url) with the configured workers until
stopped. It also takes job files dropped into the watched directories
(watch), enqueues the jobs of the cron schedules (schedules) and serves
/healthz and /metrics on server.addr.

A dropped file is taken once complete (unchanged for watch[i].settle) and
moved to accepted/ beside NAME.ids.json, or to rejected/ beside
NAME.error.txt. A schedule firing at time T parses its job file with
{date} and {time} of T; several serve processes on one PostgreSQL queue
enqueue each firing once between them.

On SIGINT or SIGTERM serve takes no new file, firing or item, lets running
items finish within --grace, puts the rest back in the queue and exits 0.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return a.serve(ctx, stop)
		},
	}
	f := cmd.Flags()
	f.String("out", "", "output root directory (config output.root)")
	f.Int("workers", 0, "items worked at once (config workers)")
	f.String("addr", "", "address of /healthz and /metrics (config server.addr)")
	bindWorkFlags(a, f, "SIGINT or SIGTERM")
	bindQueueFlag(a, f)
	a.flags = append(a.flags,
		config.Flag{Key: "output.root", Flag: f.Lookup("out")},
		config.Flag{Key: "workers", Flag: f.Lookup("workers")},
		config.Flag{Key: "server.addr", Flag: f.Lookup("addr")},
	)
	return cmd
}

// serve runs until ctx ends, then stops gracefully. stop restores the
// default signal handling, so that a second signal kills.
func (a *app) serve(ctx context.Context, stop func()) error {
	cfg, log := a.cfg, a.logger
	m := metrics.New()
	wo, err := a.prepareOutput()
	if err != nil {
		return err
	}
	var eng *pipeline.Engine
	var q *jobs.Queue // set below, before any item runs
	runner := func(ctx context.Context, args jobs.ItemArgs) error {
		start := time.Now()
		it := args.Item
		timer := m.StageTimer(it.Image != "")
		err := jobs.MakeItem(ctx, eng, args, timer.Step, wo)
		if err == nil {
			timer.Done()
		}
		m.ObserveItem(time.Since(start), err)
		switch {
		case err == nil:
			log.Debug("item done", "job", args.Job, "item", it.Index, "output", it.Output, "seconds", time.Since(start).Seconds())
		case stopped(q, err):
			log.Info("item requeued: stopping", "job", args.Job, "item", it.Index, "output", it.Output)
		default:
			log.Warn("item failed", "job", args.Job, "item", it.Index, "output", it.Output, "class", pipeline.Classify(err).String(), "err", err)
		}
		return err
	}
	q, err = a.openQueue(context.WithoutCancel(ctx), runner)
	if err != nil {
		return err
	}
	defer q.Close()
	m.AddQueue(q.Counts)

	sched, err := jobs.NewScheduler(jobs.SchedulerOptions{
		Schedules: cfg.Schedules, Queue: q, Logger: log,
		Load: func(path string, now time.Time) (*jobs.Job, error) {
			return jobs.LoadCheckedAt(path, "", cfg, now, a.resolver().Manifests())
		},
	})
	if err != nil {
		return err
	}
	m.AddScheduler(sched)
	var watchers []*jobs.Watcher
	for i, wc := range cfg.Watch {
		w, err := jobs.NewWatcher(jobs.WatchOptions{
			Dir: wc.Dir, Settle: wc.Settle, Rescan: wc.Rescan, Recursive: wc.Recursive, Logger: log,
			Load: func(path string) (*jobs.Job, error) {
				return jobs.LoadCheckedAt(path, watchedJobName(wc.Dir, path), cfg, time.Now(), a.resolver().Manifests())
			},
			Enqueue: q.Enqueue,
		})
		if err != nil {
			return fmt.Errorf("watch[%d].dir: %w", i, err)
		}
		m.AddWatcher(w)
		watchers = append(watchers, w)
	}

	eng, closeEngine, err := a.newEngine()
	if err != nil {
		return err
	}
	defer closeEngine()
	m.AddEngine(eng.ModelStats)

	var stopping atomic.Bool
	ln, err := net.Listen("tcp", cfg.Server.Addr)
	if err != nil {
		return fmt.Errorf("server.addr: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", m.Handler())
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		health(w, r, q, &stopping)
	})
	// Timeouts so that idle or slow clients cannot hold connections open.
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second,
		WriteTimeout: 30 * time.Second, IdleTimeout: 2 * time.Minute}
	srvErr := make(chan error, 1)
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			srvErr <- err
		}
	}()
	defer srv.Close()

	// A daemon outlives its database's hiccups: when the queue cannot be
	// started (the database went away just now), keep serving /healthz
	// (which says 503) and try again with growing pauses.
	for attempt := 0; ; attempt++ {
		err := q.Start(ctx)
		if err == nil {
			break
		}
		wait := min(time.Second<<min(attempt, 5), 30*time.Second)
		log.Warn("queue could not start; retrying", "err", err, "in", wait)
		select {
		case <-ctx.Done():
			log.Info("stopped before the queue started")
			return nil
		case <-time.After(wait):
		}
	}
	triggers, stopTriggers := context.WithCancel(context.WithoutCancel(ctx))
	defer stopTriggers()
	var wg sync.WaitGroup
	watchErr := make(chan error, len(watchers))
	for _, w := range watchers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := w.Run(triggers); err != nil {
				watchErr <- err
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		sched.Run(triggers)
	}()
	log.Info("serving", "addr", ln.Addr().String(), "queue", config.RedactURL(cfg.Queue.URL), "workers", cfg.Workers,
		"watch", len(watchers), "schedules", len(cfg.Schedules))

	var failure error
	select {
	case <-ctx.Done():
	case failure = <-srvErr:
		failure = fmt.Errorf("server: %w", failure)
	case failure = <-watchErr:
	}
	stop() // a second signal now kills; the next process reclaims its items
	stopping.Store(true)
	log.Info("stopping: no new files, firings or items; running items may finish", "grace", cfg.Queue.Grace)
	stopTriggers()
	wg.Wait()
	if err := q.Stop(context.Background(), cfg.Queue.Grace); err != nil {
		log.Warn("stop the queue", "err", err)
	}
	shut, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	srv.Shutdown(shut)
	cancel()
	log.Info("stopped")
	return failure
}

// watchedJobName is the job name of a file without `name:` found in a
// subdirectory of a watched directory: its relative path with the
// separators as dashes (a/b/job.yaml is "a-b-job"), so that files of the
// same name in different subdirectories do not share outputs. A file at the
// top keeps its stem (""). Characters a job name may not hold become "_".
func watchedJobName(root, path string) string {
	if r, err := filepath.Abs(root); err == nil {
		root = r
	}
	if p, err := filepath.Abs(path); err == nil {
		path = p
	}
	rel, err := filepath.Rel(root, path)
	if err != nil || filepath.Dir(rel) == "." {
		return ""
	}
	name := strings.TrimSuffix(rel, filepath.Ext(rel))
	return strings.Map(func(r rune) rune {
		switch {
		case r == filepath.Separator:
			return '-'
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '.', r == '_', r == '-':
			return r
		}
		return '_'
	}, name)
}

// stopped reports whether err is the cancellation of a stop that was asked
// for (the item goes back in the queue), not a failure; an item cancelled
// by `tessera cancel` is cancelled too, but not requeued.
func stopped(q *jobs.Queue, err error) bool {
	return q.Stopping() && errors.Is(err, context.Canceled)
}

// health answers /healthz: 200 while the queue database answers, 503 when
// it does not or the process is stopping.
func health(w http.ResponseWriter, r *http.Request, q *jobs.Queue, stopping *atomic.Bool) {
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	body := map[string]any{"status": "ok"}
	code := http.StatusOK
	counts, err := q.Counts(ctx)
	switch {
	case err != nil:
		code, body["status"], body["error"] = http.StatusServiceUnavailable, "unhealthy", "queue: "+err.Error()
	case stopping.Load():
		code, body["status"] = http.StatusServiceUnavailable, "stopping"
	}
	if err == nil {
		body["queue"] = counts
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(body)
}
