package jobs

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/riverdriver/riversqlite"
	"github.com/riverqueue/river/rivermigrate"
	"github.com/riverqueue/river/rivertype"
	_ "modernc.org/sqlite" // database/sql driver "sqlite"

	"tessera/config"
	"tessera/pipeline"
)

// ItemKind is the queue job kind of one work item.
const ItemKind = "tessera_item"

// ItemArgs is the queue job of one work item. Two jobs are the same job when
// they make the same pixels (Hash, jobs.ItemHash) into the same file (Output):
// inserting it again while one exists in any state but cancelled or discarded
// adds nothing.
//
// Plan is the item's plan, made once when it was queued: its tile steps
// give the attempt's timeout and the progress total. Root is the output
// root the item's output was resolved under; the image is written inside
// it, never through a link out of it.
type ItemArgs struct {
	Job    string        `json:"job"`
	Item   pipeline.Item `json:"item"`
	Plan   pipeline.Plan `json:"plan"`
	Root   string        `json:"root"`
	Hash   string        `json:"hash" river:"unique"`
	Output string        `json:"output" river:"unique"`
}

// Kind is the River job kind.
func (ItemArgs) Kind() string { return ItemKind }

// InsertOpts makes item jobs unique by hash and output across every live and
// completed state.
func (ItemArgs) InsertOpts() river.InsertOpts {
	return river.InsertOpts{MaxAttempts: MaxAttempts, UniqueOpts: river.UniqueOpts{ByArgs: true}}
}

// MaxAttempts is how often an item is tried before it is discarded. A
// process killed while it held the item counts as an attempt.
const MaxAttempts = 25

// NewItemArgs is the queue job for an item of the named job, with its plan
// and the output root it was resolved under.
func NewItemArgs(job string, it pipeline.Item, plan pipeline.Plan, root string) ItemArgs {
	return ItemArgs{Job: job, Item: it, Plan: plan, Root: root, Hash: ItemHash(it), Output: it.Output}
}

// ItemRunner makes and writes one item's image (see MakeItem). Errors are
// classified by pipeline.Classify: a permanent class fails the item at
// once with its reason; a transient one is retried with backoff.
type ItemRunner func(ctx context.Context, a ItemArgs) error

// QueueOptions configure OpenQueue.
type QueueOptions struct {
	// URL is sqlite://PATH or postgres://... (config queue.url).
	URL string
	// Run works items. Nil opens a client that only inserts and inspects.
	Run ItemRunner
	// Workers is how many items this process works at once.
	Workers int
	// ReapEvery is how often items held by dead processes are put back in
	// the queue (0 = 2s). See Queue.Reap.
	ReapEvery time.Duration
	// RescueAfter is River's own backstop for stuck items: an item running
	// longer than this and than its timeout is retried (0 = 1h).
	RescueAfter time.Duration
	// PollEvery is how often idle workers look for new items (0 = 250ms).
	PollEvery time.Duration
	// ItemTimeout and TileTimeout bound an attempt: ItemTimeout plus
	// TileTimeout per tile evaluation and autoencoder tile Run of the item's plan (0 = 1m and 1s;
	// config queue.item_timeout and queue.tile_timeout).
	ItemTimeout time.Duration
	TileTimeout time.Duration
	Logger      *slog.Logger
}

// Queue is the durable queue of work items, in River on SQLite or
// PostgreSQL.
//
// One queue job per item, unique by (ItemHash, output path) in every state
// but cancelled and discarded, so that submitting a file again adds nothing
// while a failed or cancelled item can be submitted anew. A worker first
// checks the output (Done): an item whose PNG and sidecar exist and agree
// completes without work. A failure of a permanent class
// (pipeline.Classify) cancels the item with its class and reason; others
// are retried with backoff (1s, 4s, 9s, ... at most a minute apart) up to
// MaxAttempts.
//
// Crashes: the output is written atomically and its sidecar last, so a
// killed process leaves at most a temp file (removed by the next run) and a
// job left "running". Each working process holds a liveness lock for its
// life (an flock on PATH.workers/ID.lock beside the SQLite file, or a
// PostgreSQL session advisory lock keyed by its River client ID); Reap,
// run at Start and every ReapEvery by every working process, puts items of
// clients whose lock is free back in the queue at once. River's own rescuer
// (RescueAfter, and the item's timeout) is the backstop for anything else,
// such as a lost machine whose connection the server has not yet dropped.
type Queue struct {
	opts     QueueOptions
	client   riverClient
	db       *sql.DB       // raw queries; River's own pool for SQLite
	pool     *pgxpool.Pool // PostgreSQL only
	pg       bool
	id       string
	live     liveness
	logger   *slog.Logger
	stopping atomic.Bool
	started  bool

	reapCancel context.CancelFunc
	reapDone   chan struct{}
	closeOnce  sync.Once
}

// riverClient is what Queue uses of river.Client, whatever its driver.
type riverClient interface {
	Start(ctx context.Context) error
	Stop(ctx context.Context) error
	StopAndCancel(ctx context.Context) error
	InsertMany(ctx context.Context, params []river.InsertManyParams) ([]*rivertype.JobInsertResult, error)
	JobList(ctx context.Context, params *river.JobListParams) (*river.JobListResult, error)
	JobGet(ctx context.Context, id int64) (*rivertype.JobRow, error)
	JobRetry(ctx context.Context, id int64) (*rivertype.JobRow, error)
	JobCancel(ctx context.Context, id int64) (*rivertype.JobRow, error)
	Subscribe(kinds ...river.EventKind) (<-chan *river.Event, func())
}

var (
	_ riverClient = (*river.Client[*sql.Tx])(nil)
	_ riverClient = (*river.Client[pgx.Tx])(nil)
)

// OpenQueue connects to the queue's database, creating and migrating it as
// needed (serialised between processes: a file lock for SQLite, an advisory
// lock for PostgreSQL), and builds a River client. With opts.Run set, Start
// begins working items.
func OpenQueue(ctx context.Context, opts QueueOptions) (*Queue, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	opts.Workers = max(opts.Workers, 1)
	if opts.ReapEvery <= 0 {
		opts.ReapEvery = 2 * time.Second
	}
	if opts.RescueAfter <= 0 {
		opts.RescueAfter = time.Hour
	}
	if opts.PollEvery <= 0 {
		opts.PollEvery = 250 * time.Millisecond
	}
	if opts.ItemTimeout <= 0 {
		opts.ItemTimeout = time.Minute
	}
	if opts.TileTimeout <= 0 {
		opts.TileTimeout = time.Second
	}
	q := &Queue{opts: opts, logger: opts.Logger, id: newClientID()}
	riverLogger := slog.New(quietHandler{opts.Logger.Handler()})
	var err error
	switch {
	case strings.HasPrefix(opts.URL, "sqlite://"):
		err = q.openSQLite(ctx, strings.TrimPrefix(opts.URL, "sqlite://"), riverLogger)
	case strings.HasPrefix(opts.URL, "postgres://"), strings.HasPrefix(opts.URL, "postgresql://"):
		err = q.openPostgres(ctx, opts.URL, riverLogger)
	default:
		err = fmt.Errorf("queue.url %q: want sqlite://PATH or postgres://USER@HOST/DB", config.RedactURL(opts.URL))
	}
	if err != nil {
		q.Close()
		return nil, err
	}
	return q, nil
}

func newClientID() string {
	b := make([]byte, 4)
	rand.Read(b)
	return fmt.Sprintf("tessera-%d-%s", os.Getpid(), hex.EncodeToString(b))
}

func (q *Queue) riverConfig(logger *slog.Logger) (*river.Config, error) {
	cfg := &river.Config{
		ID:                          q.id,
		Logger:                      logger,
		RescueStuckJobsAfter:        q.opts.RescueAfter,
		RetryPolicy:                 retryPolicy{},
		CompletedJobRetentionPeriod: -1, // completed items keep resubmits from redoing them
		CancelledJobRetentionPeriod: 30 * 24 * time.Hour,
		DiscardedJobRetentionPeriod: 30 * 24 * time.Hour,
		FetchCooldown:               min(50*time.Millisecond, q.opts.PollEvery),
		FetchPollInterval:           q.opts.PollEvery,
		JobTimeout:                  -1,
		MaxAttempts:                 MaxAttempts,
	}
	if q.opts.Run != nil {
		workers := river.NewWorkers()
		if err := river.AddWorkerSafely(workers, &itemWorker{q: q}); err != nil {
			return nil, err
		}
		cfg.Workers = workers
		cfg.Queues = map[string]river.QueueConfig{river.QueueDefault: {MaxWorkers: q.opts.Workers}}
	}
	return cfg, nil
}

// openSQLite opens the database file with one connection, as River's SQLite
// driver asks, and a busy timeout so that several processes share it.
func (q *Queue) openSQLite(ctx context.Context, path string, logger *slog.Logger) error {
	if path == "" {
		return errors.New("queue.url: sqlite:// needs a file path")
	}
	if dir := filepath.Dir(path); dir != "" {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("queue %s: %w", path, err)
		}
	}
	dsn := "file:" + path + "?_pragma=busy_timeout(30000)&_pragma=journal_mode(WAL)&_pragma=synchronous(NORMAL)&_txlock=immediate"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return fmt.Errorf("queue %s: %w", path, err)
	}
	db.SetMaxOpenConns(1)
	q.db = db
	driver := riversqlite.New(db)
	unlock, err := lockFile(path + ".migrate.lock")
	if err != nil {
		return fmt.Errorf("queue %s: lock for migration: %w", path, err)
	}
	err = migrate(ctx, driver, logger)
	unlock()
	if err != nil {
		return fmt.Errorf("queue %s: %w", path, err)
	}
	if q.opts.Run != nil {
		if q.live, err = newFileLiveness(filepath.Join(filepath.Dir(path), filepath.Base(path)+".workers"), q.id); err != nil {
			return fmt.Errorf("queue %s: %w", path, err)
		}
	}
	cfg, err := q.riverConfig(logger)
	if err != nil {
		return err
	}
	cfg.PollOnly = true
	client, err := river.NewClient(driver, cfg)
	if err != nil {
		return fmt.Errorf("queue %s: %w", path, err)
	}
	q.client = client
	return nil
}

// openPostgres connects a pool and migrates under an advisory lock.
func (q *Queue) openPostgres(ctx context.Context, url string, logger *slog.Logger) error {
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		return fmt.Errorf("queue: %w", err)
	}
	q.pool, q.pg = pool, true
	q.db = stdlib.OpenDBFromPool(pool)
	driver := riverpgxv5.New(pool)
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("queue: connect: %w", err)
	}
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock($1)", migrateLockKey); err != nil {
		conn.Release()
		return fmt.Errorf("queue: lock for migration: %w", err)
	}
	err = migrate(ctx, driver, logger)
	conn.Exec(context.Background(), "SELECT pg_advisory_unlock($1)", migrateLockKey)
	conn.Release()
	if err != nil {
		return fmt.Errorf("queue: %w", err)
	}
	if q.opts.Run != nil {
		if q.live, err = newPGLiveness(ctx, pool, q.id); err != nil {
			return fmt.Errorf("queue: %w", err)
		}
	}
	cfg, err := q.riverConfig(logger)
	if err != nil {
		return err
	}
	client, err := river.NewClient(driver, cfg)
	if err != nil {
		return fmt.Errorf("queue: %w", err)
	}
	q.client = client
	return nil
}

// migrateLockKey is the PostgreSQL advisory lock held while migrating.
const migrateLockKey int64 = 0x7465737365726101

func migrate[TTx any](ctx context.Context, driver riverdriver.Driver[TTx], logger *slog.Logger) error {
	m, err := rivermigrate.New(driver, &rivermigrate.Config{Logger: logger})
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	if _, err := m.Migrate(ctx, rivermigrate.DirectionUp, nil); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	return nil
}

// Stopping reports whether a stop past its grace period is cancelling the
// running items, which go back in the queue: their context.Canceled is
// not a failure (unlike that of an item cancelled by `tessera cancel`).
func (q *Queue) Stopping() bool { return q.stopping.Load() }

// ID is this process's River client ID, recorded on the items it works.
func (q *Queue) ID() string { return q.id }

// Enqueued is the outcome of inserting one item.
type Enqueued struct {
	ID        int64
	Item      pipeline.Item
	Job       string
	Duplicate bool               // the queue already held this item
	State     rivertype.JobState // its state after the insert
}

// IDs are the queue job ids of es, in order.
func IDs(es []Enqueued) []int64 {
	ids := make([]int64, len(es))
	for i, e := range es {
		ids[i] = e.ID
	}
	return ids
}

// Enqueue inserts one queue job per item of job, with its plan. Items the
// queue already holds are not inserted again; a completed one whose output
// has since gone missing (or no longer matches its sidecar) is made
// available again. A job without plans (Parse rather than LoadChecked), or
// whose items cannot be encoded, is refused before anything is inserted,
// with a *ValidationError.
func (q *Queue) Enqueue(ctx context.Context, job *Job) ([]Enqueued, error) {
	if len(job.Plans) != len(job.Items) {
		return nil, &ValidationError{File: job.Path, Problems: []string{fmt.Sprintf("%d items but %d plans: load the job with its models (LoadChecked)", len(job.Items), len(job.Plans))}}
	}
	root := job.Root
	for i, it := range job.Items {
		if _, err := json.Marshal(NewItemArgs(job.Name, it, job.Plans[i], root)); err != nil {
			return nil, &ValidationError{File: job.Path, Problems: []string{fmt.Sprintf("items (index %d): %v", it.Index, err)}}
		}
	}
	out := make([]Enqueued, 0, len(job.Items))
	const chunk = 500
	for start := 0; start < len(job.Items); start += chunk {
		items := job.Items[start:min(start+chunk, len(job.Items))]
		params := make([]river.InsertManyParams, len(items))
		for i, it := range items {
			params[i] = river.InsertManyParams{Args: NewItemArgs(job.Name, it, job.Plans[start+i], root)}
		}
		res, err := q.client.InsertMany(ctx, params)
		if err != nil {
			return out, fmt.Errorf("enqueue %s: %w", job.Name, err)
		}
		for i, r := range res {
			e := Enqueued{ID: r.Job.ID, Item: items[i], Job: job.Name, Duplicate: r.UniqueSkippedAsDuplicate, State: r.Job.State}
			if e.Duplicate && e.State == rivertype.JobStateCompleted && !Done(root, items[i]) {
				row, err := q.client.JobRetry(ctx, e.ID)
				if err != nil {
					return out, fmt.Errorf("enqueue %s: requeue item %d whose output is missing: %w", job.Name, items[i].Index, err)
				}
				e.State = row.State
				e.Duplicate = false
			}
			out = append(out, e)
		}
	}
	return out, nil
}

// Start begins working items (when opened with Run) and reclaiming items of
// dead processes. It is a no-op for an insert-only queue.
func (q *Queue) Start(ctx context.Context) error {
	if q.opts.Run == nil || q.started {
		return nil
	}
	if n, err := q.Reap(ctx); err != nil {
		q.logger.Warn("reclaim items of stopped processes", "err", err)
	} else if n > 0 {
		q.logger.Info("put items held by stopped processes back in the queue", "count", n)
	}
	if err := q.client.Start(context.WithoutCancel(ctx)); err != nil {
		return fmt.Errorf("queue: start: %w", err)
	}
	q.started = true
	rctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	q.reapCancel, q.reapDone = cancel, make(chan struct{})
	go func() {
		defer close(q.reapDone)
		t := time.NewTicker(q.opts.ReapEvery)
		defer t.Stop()
		for {
			select {
			case <-rctx.Done():
				return
			case <-t.C:
				if n, err := q.Reap(rctx); err != nil && rctx.Err() == nil {
					q.logger.Warn("reclaim items of stopped processes", "err", err)
				} else if n > 0 {
					q.logger.Info("put items held by stopped processes back in the queue", "count", n)
				}
			}
		}
	}()
	return nil
}

// Stop takes no new items and waits up to grace for the running ones to
// finish; items still running then are cancelled and put back in the queue
// as available (not counted as an attempt). It is safe to call without
// Start and more than once.
func (q *Queue) Stop(ctx context.Context, grace time.Duration) error {
	if !q.started {
		return nil
	}
	q.started = false
	if q.reapCancel != nil {
		q.reapCancel()
		<-q.reapDone
	}
	soft, cancel := context.WithTimeout(ctx, grace)
	err := q.client.Stop(soft)
	cancel()
	if err == nil {
		return nil
	}
	q.stopping.Store(true)
	hard, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	if err := q.client.StopAndCancel(hard); err != nil {
		return fmt.Errorf("queue: stop: %w", err)
	}
	return nil
}

// Close stops the client if needed and closes the database. Safe to call
// more than once.
func (q *Queue) Close() error {
	q.closeOnce.Do(func() {
		if q.started {
			q.Stop(context.Background(), 0)
		}
		if q.live != nil {
			q.live.close()
		}
		if q.db != nil {
			q.db.Close()
		}
		if q.pool != nil {
			q.pool.Close()
		}
	})
	return nil
}

// JobInfo is one queue job as status, retry and cancel see it.
type JobInfo struct {
	ID          int64      `json:"id"`
	State       string     `json:"state"`
	Job         string     `json:"job"`
	Item        int        `json:"index"`
	Seed        uint64     `json:"seed"`
	Output      string     `json:"output"`
	Attempt     int        `json:"attempt"`
	MaxAttempts int        `json:"max_attempts"`
	Worker      string     `json:"worker,omitempty"`
	AttemptedAt *time.Time `json:"attempted_at,omitempty"`
	FinalizedAt *time.Time `json:"finalized_at,omitempty"`
	ScheduledAt time.Time  `json:"scheduled_at"`
	Error       string     `json:"error,omitempty"`
	Skipped     bool       `json:"skipped,omitempty"` // completed without work: the output was already there
	Seconds     float64    `json:"seconds,omitempty"` // of the last attempt, once finalized
}

// Final reports whether the job will not run again by itself.
func (j JobInfo) Final() bool {
	switch rivertype.JobState(j.State) {
	case rivertype.JobStateCompleted, rivertype.JobStateCancelled, rivertype.JobStateDiscarded:
		return true
	}
	return false
}

// Failed reports whether the job ended without an image.
func (j JobInfo) Failed() bool {
	return j.State == string(rivertype.JobStateCancelled) || j.State == string(rivertype.JobStateDiscarded)
}

func infoOf(row *rivertype.JobRow) JobInfo {
	j := JobInfo{ID: row.ID, State: string(row.State), Attempt: row.Attempt, MaxAttempts: row.MaxAttempts,
		AttemptedAt: row.AttemptedAt, FinalizedAt: row.FinalizedAt, ScheduledAt: row.ScheduledAt}
	var a ItemArgs
	if json.Unmarshal(row.EncodedArgs, &a) == nil {
		j.Job, j.Item, j.Seed, j.Output = a.Job, a.Item.Index, a.Item.Seed, a.Output
	}
	if n := len(row.AttemptedBy); n > 0 {
		j.Worker = row.AttemptedBy[n-1]
	}
	if n := len(row.Errors); n > 0 {
		j.Error = strings.TrimPrefix(row.Errors[n-1].Error, "JobCancelError: ")
	}
	if out := row.Output(); len(out) > 0 {
		var o itemOutput
		if json.Unmarshal(out, &o) == nil {
			j.Skipped = o.Skipped
		}
	}
	if row.FinalizedAt != nil && row.AttemptedAt != nil {
		j.Seconds = row.FinalizedAt.Sub(*row.AttemptedAt).Seconds()
	}
	return j
}

// Jobs returns the jobs with the given ids, in the order given; ids the
// queue no longer holds are left out.
func (q *Queue) Jobs(ctx context.Context, ids []int64) ([]JobInfo, error) {
	byID := make(map[int64]JobInfo, len(ids))
	const chunk = 500
	for start := 0; start < len(ids); start += chunk {
		part := ids[start:min(start+chunk, len(ids))]
		res, err := q.client.JobList(ctx, river.NewJobListParams().IDs(part...).First(len(part)))
		if err != nil {
			return nil, fmt.Errorf("queue: list jobs: %w", err)
		}
		for _, row := range res.Jobs {
			byID[row.ID] = infoOf(row)
		}
	}
	out := make([]JobInfo, 0, len(ids))
	for _, id := range ids {
		if j, ok := byID[id]; ok {
			out = append(out, j)
		}
	}
	return out, nil
}

// List returns every item job in the given states (all states when none),
// oldest first.
func (q *Queue) List(ctx context.Context, states ...rivertype.JobState) ([]JobInfo, error) {
	if len(states) == 0 {
		states = allStates
	}
	params := river.NewJobListParams().Kinds(ItemKind).States(states...).OrderBy(river.JobListOrderByID, river.SortOrderAsc).First(1000)
	var out []JobInfo
	for {
		res, err := q.client.JobList(ctx, params)
		if err != nil {
			return nil, fmt.Errorf("queue: list jobs: %w", err)
		}
		for _, row := range res.Jobs {
			out = append(out, infoOf(row))
		}
		if len(res.Jobs) < 1000 || res.LastCursor == nil {
			return out, nil
		}
		params = params.After(res.LastCursor)
	}
}

// UnfinishedOutputs returns the outputs of the items of the named job that
// will still run (states JobInfo.Final does not call final), counted in the
// database: a firing asks this of a queue that may hold many thousands of
// other items.
func (q *Queue) UnfinishedOutputs(ctx context.Context, job string) ([]string, error) {
	states := make([]string, len(unfinished))
	for i, st := range unfinished {
		states[i] = "'" + string(st) + "'" // constants of River's, not input
	}
	// ->> reads a JSON field in PostgreSQL and in SQLite (3.38 and later) alike.
	rows, err := q.db.QueryContext(ctx, "SELECT args ->> 'output' FROM river_job WHERE kind = "+q.arg(1)+
		" AND state IN ("+strings.Join(states, ", ")+") AND args ->> 'job' = "+q.arg(2), ItemKind, job)
	if err != nil {
		return nil, fmt.Errorf("queue: list unfinished items of %s: %w", job, err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var o sql.NullString
		if err := rows.Scan(&o); err != nil {
			return nil, fmt.Errorf("queue: list unfinished items of %s: %w", job, err)
		}
		out = append(out, o.String)
	}
	return out, rows.Err()
}

// unfinished are the states of items that will still run: those that
// JobInfo.Final does not call final.
var unfinished = func() []rivertype.JobState {
	var out []rivertype.JobState
	for _, st := range allStates {
		if !(JobInfo{State: string(st)}).Final() {
			out = append(out, st)
		}
	}
	return out
}()

var allStates = []rivertype.JobState{
	rivertype.JobStateAvailable, rivertype.JobStateCancelled, rivertype.JobStateCompleted,
	rivertype.JobStateDiscarded, rivertype.JobStatePending, rivertype.JobStateRetryable,
	rivertype.JobStateRunning, rivertype.JobStateScheduled,
}

// Counts returns how many item jobs are in each state.
func (q *Queue) Counts(ctx context.Context) (map[string]int, error) {
	rows, err := q.db.QueryContext(ctx, "SELECT state, count(*) FROM river_job WHERE kind = "+q.arg(1)+" GROUP BY state", ItemKind)
	if err != nil {
		return nil, fmt.Errorf("queue: count jobs: %w", err)
	}
	defer rows.Close()
	out := map[string]int{}
	for _, s := range allStates {
		out[string(s)] = 0
	}
	for rows.Next() {
		var s string
		var n int
		if err := rows.Scan(&s, &n); err != nil {
			return nil, err
		}
		out[s] = n
	}
	return out, rows.Err()
}

// Retry makes a failed, cancelled, retryable or completed job available now.
func (q *Queue) Retry(ctx context.Context, id int64) (JobInfo, error) {
	row, err := q.client.JobRetry(ctx, id)
	if err != nil {
		return JobInfo{}, fmt.Errorf("retry job %d: %w", id, err)
	}
	return infoOf(row), nil
}

// Cancel cancels a job that has not finished; a running one is cancelled
// by its worker as soon as it hears of it.
func (q *Queue) Cancel(ctx context.Context, id int64) (JobInfo, error) {
	row, err := q.client.JobCancel(ctx, id)
	if err != nil {
		return JobInfo{}, fmt.Errorf("cancel job %d: %w", id, err)
	}
	return infoOf(row), nil
}

// Get returns one job.
func (q *Queue) Get(ctx context.Context, id int64) (JobInfo, error) {
	row, err := q.client.JobGet(ctx, id)
	if err != nil {
		return JobInfo{}, fmt.Errorf("job %d: %w", id, err)
	}
	return infoOf(row), nil
}

// Reap puts items held by processes that are gone back in the queue, at
// once and without waiting for River's rescuer (which waits out the item's
// timeout). A working process holds a liveness lock for its whole life: an
// flock on a file beside the SQLite database, or a PostgreSQL advisory
// lock on its own connection. The kernel or the server releases it when
// the process dies, however it dies; an item left running by a client
// whose lock is free is made available again. The killed attempt still
// counts towards MaxAttempts.
func (q *Queue) Reap(ctx context.Context) (int, error) {
	if q.live == nil {
		return 0, nil
	}
	res, err := q.client.JobList(ctx, river.NewJobListParams().Kinds(ItemKind).States(rivertype.JobStateRunning).First(1000))
	if err != nil {
		return 0, fmt.Errorf("list running items: %w", err)
	}
	n := 0
	checked := map[string]bool{}
	for _, row := range res.Jobs {
		if len(row.AttemptedBy) == 0 {
			continue
		}
		owner := row.AttemptedBy[len(row.AttemptedBy)-1]
		if owner == q.id {
			continue
		}
		dead, ok := checked[owner]
		if !ok {
			alive, err := q.live.alive(ctx, owner)
			if err != nil {
				return n, err
			}
			dead = !alive
			checked[owner] = dead
		}
		if !dead {
			continue
		}
		now := "datetime('now', 'subsec')"
		if q.pg {
			now = "now()"
		}
		r, err := q.db.ExecContext(ctx, "UPDATE river_job SET state = 'available', scheduled_at = "+now+
			" WHERE id = "+q.arg(1)+" AND state = 'running' AND attempt = "+q.arg(2), row.ID, row.Attempt)
		if err != nil {
			return n, fmt.Errorf("requeue item job %d: %w", row.ID, err)
		}
		if k, _ := r.RowsAffected(); k > 0 {
			n++
			q.logger.Info("requeued an item its stopped worker held", "job_id", row.ID, "worker", owner)
		}
	}
	return n, nil
}

func (q *Queue) arg(i int) string {
	if q.pg {
		return fmt.Sprintf("$%d", i)
	}
	return "?"
}

// retryPolicy backs off quadratically from one second, capped at a minute,
// so that a run waiting for its items is not held for hours by a retry.
type retryPolicy struct{}

func (retryPolicy) NextRetry(job *rivertype.JobRow) time.Time {
	n := float64(max(len(job.Errors), 1))
	d := time.Duration(math.Min(n*n, 60) * float64(time.Second))
	return time.Now().Add(d)
}

// itemOutput is what an item job records on completion.
type itemOutput struct {
	Skipped bool `json:"skipped,omitempty"`
}

// itemWorker works item jobs with the queue's runner.
type itemWorker struct {
	river.WorkerDefaults[ItemArgs]
	q *Queue
}

// Timeout is River's bound on one attempt: twice the item's own
// (attemptTimeout), so that River's rescuer never takes a slow item for a
// stuck one before the item's own deadline has cancelled it.
func (w *itemWorker) Timeout(job *river.Job[ItemArgs]) time.Duration {
	return 2 * w.q.attemptTimeout(job.Args.Plan)
}

// attemptTimeout is the time allowed for one attempt at an item of this
// plan: queue.item_timeout plus queue.tile_timeout per tile evaluation.
func (q *Queue) attemptTimeout(p pipeline.Plan) time.Duration {
	return q.opts.ItemTimeout + time.Duration(p.TileSteps()+p.AutoencoderRuns())*q.opts.TileTimeout
}

// Work makes one item within its plan's timeout. An item whose output and
// sidecar already exist and agree is completed without work. A failure of
// a permanent class (pipeline.Classify) cancels the item with its class
// and reason, at the first attempt; a transient one is retried.
func (w *itemWorker) Work(ctx context.Context, job *river.Job[ItemArgs]) error {
	if job.Attempt > 1 {
		if n := RemoveStaleTempsOf(job.Args.Root, job.Args.Item); n > 0 {
			w.q.logger.Info("removed temp files an earlier attempt left", "job_id", job.ID, "count", n, "output", job.Args.Item.Output)
		}
	}
	if Done(job.Args.Root, job.Args.Item) {
		return river.RecordOutput(ctx, itemOutput{Skipped: true})
	}
	attempt, cancel := context.WithTimeout(ctx, w.q.attemptTimeout(job.Args.Plan))
	defer cancel()
	err := w.q.opts.Run(attempt, job.Args)
	switch {
	case err == nil:
		return nil
	case w.q.stopping.Load() && ctx.Err() != nil:
		// Cancelled by a graceful stop past its grace period: back in the
		// queue, without counting the attempt.
		return river.JobSnooze(0)
	}
	if c := pipeline.Classify(err); c.Permanent() {
		return river.JobCancel(fmt.Errorf("%s: %w", c, err))
	}
	if ctx.Err() == nil && attempt.Err() != nil {
		return fmt.Errorf("timed out after %s (queue.item_timeout + queue.tile_timeout × %d tile evaluations and %d autoencoder tile Runs): %w", w.q.attemptTimeout(job.Args.Plan), job.Args.Plan.TileSteps(), job.Args.Plan.AutoencoderRuns(), err)
	}
	return err
}

// quietHandler passes on River's warnings and errors but not its chatter.
type quietHandler struct{ slog.Handler }

func (h quietHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= slog.LevelWarn && h.Handler.Enabled(ctx, l)
}
func (h quietHandler) WithAttrs(a []slog.Attr) slog.Handler {
	return quietHandler{h.Handler.WithAttrs(a)}
}
func (h quietHandler) WithGroup(n string) slog.Handler { return quietHandler{h.Handler.WithGroup(n)} }
