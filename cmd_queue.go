package main

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"strconv"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"tessera/config"
	"tessera/jobs"
	"tessera/models"
	"tessera/onnx"
	"tessera/pipeline"
	"tessera/stages"
)

// bindWorkFlags adds the options of commands that work items (run, serve):
// --grace, --rescue-after and --reap-every (config queue.grace,
// queue.rescue_after, queue.reap_every).
func bindWorkFlags(a *app, f *pflag.FlagSet, stopSignals string) {
	d := config.Default().Queue
	f.Duration("grace", d.Grace, "on "+stopSignals+", how long running items may take to finish before they are put back in the queue (config queue.grace)")
	f.Duration("rescue-after", d.RescueAfter, "River's backstop: an item running longer than this and its timeout is retried (config queue.rescue_after)")
	f.Duration("reap-every", d.ReapEvery, "how often items held by stopped processes are put back in the queue (config queue.reap_every)")
	a.flags = append(a.flags,
		config.Flag{Key: "queue.grace", Flag: f.Lookup("grace")},
		config.Flag{Key: "queue.rescue_after", Flag: f.Lookup("rescue-after")},
		config.Flag{Key: "queue.reap_every", Flag: f.Lookup("reap-every")},
	)
}

// bindQueueFlag adds --queue (config queue.url) to a command.
func bindQueueFlag(a *app, f *pflag.FlagSet) {
	f.String("queue", "", "queue database: sqlite://PATH or postgres://USER@HOST/DB (config queue.url)")
	a.flags = append(a.flags, config.Flag{Key: "queue.url", Flag: f.Lookup("queue")})
}

// resolver finds models where the configuration says.
func (a *app) resolver() models.Resolver {
	return models.Resolver{Dirs: a.cfg.Models.Dirs, AllowPaths: a.cfg.Models.AllowPaths}
}

// prepareOutput readies the output root for a process that works items
// (run, serve), before any item is computed: it creates the root, checks
// that a file can be written in it, removes temp files a crash left behind
// and returns how images are written.
func (a *app) prepareOutput() (jobs.WriteOptions, error) {
	root := a.cfg.Output.Root
	if err := jobs.CheckRoot(root); err != nil {
		return jobs.WriteOptions{}, fmt.Errorf("output.root: %w", err)
	}
	if n, err := jobs.RemoveStaleTemps(root); err == nil && n > 0 {
		a.logger.Info("removed temp files left by an interrupted run", "count", n, "dir", root)
	}
	level, err := stages.PNGCompression(a.cfg.Output.Compression)
	if err != nil {
		return jobs.WriteOptions{}, fmt.Errorf("output.compression: %w", err)
	}
	return jobs.WriteOptions{Version: version, Compression: level}, nil
}

// newEngine opens ONNX Runtime and an engine on the configured models, with
// run's --batch (0, auto, elsewhere); closeAll releases both.
func (a *app) newEngine() (eng *pipeline.Engine, closeAll func(), err error) {
	env, err := onnx.Open(a.cfg.Runtime, a.logger)
	if err != nil {
		return nil, nil, err
	}
	eng = pipeline.New(env, a.resolver(), pipeline.Options{Workers: a.cfg.Workers, Batch: a.batch, MemoryBudget: a.cfg.Memory.Budget,
		TextCache: filepath.Join(".tessera", "text-cache")}, a.logger)
	return eng, func() { eng.Close(); env.Close() }, nil
}

// openQueue opens the configured queue; run, when not nil, works items.
func (a *app) openQueue(ctx context.Context, run jobs.ItemRunner) (*jobs.Queue, error) {
	return jobs.OpenQueue(ctx, jobs.QueueOptions{
		URL: a.cfg.Queue.URL, Run: run, Workers: a.cfg.Workers, Logger: a.logger,
		RescueAfter: a.cfg.Queue.RescueAfter, ReapEvery: a.cfg.Queue.ReapEvery,
		ItemTimeout: a.cfg.Queue.ItemTimeout, TileTimeout: a.cfg.Queue.TileTimeout,
	})
}

// loadJobFiles loads, checks and plans job files, each on its own: a bad
// file is reported on stderr and listed in bad, and the others go on.
func (a *app) loadJobFiles(files []string, stderr io.Writer) (loaded []*jobs.Job, bad []string) {
	describe := a.resolver().Manifests()
	for _, f := range files {
		job, err := jobs.LoadChecked(f, a.cfg, describe)
		if err != nil {
			fmt.Fprintf(stderr, "tessera: %v\n", err)
			bad = append(bad, f)
			continue
		}
		loaded = append(loaded, job)
	}
	return loaded, bad
}

// selectJobs finds the queue jobs that args name: a job id, an output path
// (as the job file resolved it, or the same file by another spelling), or
// a job name (every item of that job file).
func selectJobs(ctx context.Context, q *jobs.Queue, args []string) ([]jobs.JobInfo, error) {
	all, err := q.List(ctx)
	if err != nil {
		return nil, err
	}
	var out []jobs.JobInfo
	seen := map[int64]bool{}
	for _, arg := range args {
		n := 0
		absArg, _ := filepath.Abs(arg)
		id, idErr := strconv.ParseInt(arg, 10, 64)
		for _, j := range all {
			absOut, _ := filepath.Abs(j.Output)
			if (idErr == nil && j.ID == id) || j.Job == arg || j.Output == arg || absOut == absArg {
				n++
				if !seen[j.ID] {
					seen[j.ID] = true
					out = append(out, j)
				}
			}
		}
		if n == 0 {
			return nil, fail(1, "%q names no job id, output path or job name in the queue", arg)
		}
	}
	return out, nil
}

func newRetryCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "retry ID|OUTPUT|JOBNAME...",
		Short: "Put failed or cancelled items back in the queue",
		Long: `Retry makes the named items available again: by queue job id, by output
path, or by job name (every failed or cancelled item of that job file).
Items that are waiting, running or done are left alone unless named by id
or output.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.retryOrCancel(cmd.Context(), args, cmd.OutOrStdout(), true)
		},
	}
	bindQueueFlag(a, cmd.Flags())
	return cmd
}

func newCancelCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "cancel ID|OUTPUT|JOBNAME...",
		Short: "Cancel items that have not finished",
		Long: `Cancel cancels the named items that have not finished: by queue job id, by
output path, or by job name. A running item stops as soon as its worker
hears of it; tessera retry brings a cancelled item back.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.retryOrCancel(cmd.Context(), args, cmd.OutOrStdout(), false)
		},
	}
	bindQueueFlag(a, cmd.Flags())
	return cmd
}

func (a *app) retryOrCancel(ctx context.Context, args []string, stdout io.Writer, retry bool) error {
	q, err := a.openQueue(ctx, nil)
	if err != nil {
		return err
	}
	defer q.Close()
	sel, err := selectJobs(ctx, q, args)
	if err != nil {
		return err
	}
	byName := func(j jobs.JobInfo) bool {
		for _, arg := range args {
			if arg == strconv.FormatInt(j.ID, 10) || arg == j.Output {
				return false
			}
			if abs, _ := filepath.Abs(arg); abs != "" {
				if o, _ := filepath.Abs(j.Output); o == abs {
					return false
				}
			}
		}
		return true
	}
	n := 0
	for _, j := range sel {
		var res jobs.JobInfo
		switch {
		case retry:
			if byName(j) && !j.Failed() {
				continue
			}
			res, err = q.Retry(ctx, j.ID)
		default:
			if j.Final() {
				if !byName(j) {
					fmt.Fprintf(stdout, "job %d (%s) is already %s\n", j.ID, j.Output, j.State)
				}
				continue
			}
			res, err = q.Cancel(ctx, j.ID)
		}
		if err != nil {
			return err
		}
		n++
		fmt.Fprintf(stdout, "job %d (%s): %s -> %s\n", j.ID, j.Output, j.State, res.State)
	}
	verb := "retried"
	if !retry {
		verb = "cancelled"
	}
	fmt.Fprintf(stdout, "%d item(s) %s\n", n, verb)
	return nil
}
