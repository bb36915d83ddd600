package jobs

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/riverqueue/river"

	"tessera/jobs/pgtest"
	"tessera/pipeline"
)

type backend struct {
	name string
	url  func(t testing.TB) string
}

var backends = []backend{
	{"sqlite", func(t testing.TB) string { return "sqlite://" + filepath.Join(t.TempDir(), "queue.db") }},
	{"postgres", pgtest.SchemaURL},
}

// queueBundle is what a queue test needs.
type queueBundle struct {
	url string
	out string
	job *Job
}

func setup(t *testing.T, b backend, n int) queueBundle {
	t.Helper()
	out := t.TempDir()
	job := &Job{Name: "t", Root: out}
	for i := 0; i < n; i++ {
		job.Items = append(job.Items, pipeline.Item{Index: i, Seed: uint64(100 + i), Width: 8, Height: 8, Class: -1,
			SR: pipeline.StageParams{Model: "oracle-sr"}, Output: filepath.Join(out, fmt.Sprintf("%04d.png", i))})
		job.Plans = append(job.Plans, testPlan)
	}
	return queueBundle{url: b.url(t), out: out, job: job}
}

func open(t *testing.T, url string, run ItemRunner) *Queue {
	t.Helper()
	q, err := OpenQueue(context.Background(), QueueOptions{URL: url, Run: run, Workers: 2, PollEvery: 20 * time.Millisecond, ReapEvery: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Close() })
	return q
}

// testPlan is the plan of the queue tests' items: one base stage of one
// tile and one step.
var testPlan = pipeline.Plan{Width: 8, Height: 8, Stages: []pipeline.StagePlan{{Kind: "base", Width: 8, Height: 8, Steps: 1, Tiles: 1}}}

// writeImage is a runner that writes a flat 8x8 image.
func writeImage(ctx context.Context, a ItemArgs) error {
	it := a.Item
	res := &pipeline.Result{Image: make([]float32, 3*it.Width*it.Height), Channels: 3, Width: it.Width, Height: it.Height}
	return Write(a.Root, a.Job, it, res, WriteOptions{Version: "test"})
}

// waitFinal waits until every job is final and returns them.
func waitFinal(t *testing.T, q *Queue, ids []int64) []JobInfo {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		infos, err := q.Jobs(context.Background(), ids)
		if err != nil {
			t.Fatal(err)
		}
		final := 0
		for _, j := range infos {
			if j.Final() {
				final++
			}
		}
		if final == len(ids) {
			return infos
		}
		if time.Now().After(deadline) {
			t.Fatalf("jobs not final after 30s: %+v", infos)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestQueue(t *testing.T) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) {
			t.Run("UniqueOnResubmit", func(t *testing.T) { testUniqueOnResubmit(t, b) })
			t.Run("WorkSkipDoneAndRequeueMissing", func(t *testing.T) { testWork(t, b) })
			t.Run("FailuresRetryCancel", func(t *testing.T) { testFailures(t, b) })
			t.Run("ReapDeadWorker", func(t *testing.T) { testReap(t, b) })
			t.Run("ConcurrentOpen", func(t *testing.T) { testConcurrentOpen(t, b) })
			t.Run("UnfinishedOutputs", func(t *testing.T) { testUnfinishedOutputs(t, b) })
			t.Run("TimeoutFromPlan", func(t *testing.T) { testTimeoutFromPlan(t, b) })
		})
	}
}

func testUniqueOnResubmit(t *testing.T, b backend) {
	s := setup(t, b, 5)
	q := open(t, s.url, nil)
	ctx := context.Background()
	first, err := q.Enqueue(ctx, s.job)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range first {
		if e.Duplicate {
			t.Fatalf("first insert marked duplicate: %+v", e)
		}
	}
	// A second process (a fresh client) resubmits the same file.
	q2 := open(t, s.url, nil)
	again, err := q2.Enqueue(ctx, s.job)
	if err != nil {
		t.Fatal(err)
	}
	for i, e := range again {
		if !e.Duplicate || e.ID != first[i].ID {
			t.Fatalf("resubmit %d: %+v, want duplicate of %d", i, e, first[i].ID)
		}
	}
	// The same pixels to another output are another item.
	moved := &Job{Name: "t", Root: s.out, Items: []pipeline.Item{s.job.Items[0]}, Plans: []pipeline.Plan{testPlan}}
	moved.Items[0].Output = filepath.Join(s.out, "elsewhere.png")
	if res, err := q.Enqueue(ctx, moved); err != nil || res[0].Duplicate {
		t.Fatalf("other output: %+v %v", res, err)
	}
	counts, err := q.Counts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if counts["available"] != 6 || counts["running"] != 0 {
		t.Fatalf("counts = %v, want 6 available", counts)
	}
}

func testWork(t *testing.T, b backend) {
	s := setup(t, b, 6)
	// Item 0 is already done before it is queued: no work for it.
	if err := writeImage(context.Background(), NewItemArgs("t", s.job.Items[0], testPlan, s.out)); err != nil {
		t.Fatal(err)
	}
	var calls atomic.Int32
	q := open(t, s.url, func(ctx context.Context, a ItemArgs) error {
		calls.Add(1)
		return writeImage(ctx, a)
	})
	ctx := context.Background()
	res, err := q.Enqueue(ctx, s.job)
	if err != nil {
		t.Fatal(err)
	}
	if err := q.Start(ctx); err != nil {
		t.Fatal(err)
	}
	infos := waitFinal(t, q, IDs(res))
	for i, j := range infos {
		if j.State != "completed" || j.Skipped != (i == 0) || !Done(s.out, s.job.Items[i]) {
			t.Errorf("item %d: %+v, done %v", i, j, Done(s.out, s.job.Items[i]))
		}
	}
	if calls.Load() != 5 {
		t.Errorf("runner called %d times, want 5", calls.Load())
	}
	// Resubmitting the finished file adds nothing; an item whose output
	// went missing is made available again and redone.
	os.Remove(s.job.Items[3].Output)
	again, err := q.Enqueue(ctx, s.job)
	if err != nil {
		t.Fatal(err)
	}
	for i, e := range again {
		if wantDup := i != 3; e.Duplicate != wantDup || e.ID != res[i].ID {
			t.Errorf("resubmit %d: %+v", i, e)
		}
	}
	waitFinal(t, q, IDs(again))
	if calls.Load() != 6 || !Done(s.out, s.job.Items[3]) {
		t.Errorf("after requeue: %d calls, done %v", calls.Load(), Done(s.out, s.job.Items[3]))
	}
	if err := q.Stop(ctx, time.Second); err != nil {
		t.Fatal(err)
	}
	if err := q.Stop(ctx, time.Second); err != nil {
		t.Fatal("second stop:", err)
	}
}

func testFailures(t *testing.T, b backend) {
	s := setup(t, b, 3)
	var transient atomic.Bool
	transient.Store(true)
	q := open(t, s.url, func(ctx context.Context, a ItemArgs) error {
		switch a.Item.Index {
		case 0:
			return pipeline.ModelUnusable(errors.New("sr.model: unknown model \"nope\""))
		case 1:
			if transient.Load() {
				return errors.New("write: no space left on device")
			}
		case 2:
			<-ctx.Done() // until cancelled
			return ctx.Err()
		}
		return writeImage(ctx, a)
	})
	ctx := context.Background()
	res, err := q.Enqueue(ctx, s.job)
	if err != nil {
		t.Fatal(err)
	}
	if err := q.Start(ctx); err != nil {
		t.Fatal(err)
	}
	waitFinal(t, q, IDs(res[:1]))
	j, _ := q.Get(ctx, res[0].ID)
	if j.State != "cancelled" || !strings.Contains(j.Error, `model unusable: sr.model: unknown model "nope"`) || j.Attempt != 1 {
		t.Fatalf("permanent failure: %+v", j)
	}
	// The transient failure is retried with backoff.
	deadline := time.Now().Add(10 * time.Second)
	for {
		j, _ = q.Get(ctx, res[1].ID)
		if j.State == "retryable" && strings.Contains(j.Error, "no space") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("transient failure: %+v", j)
		}
		time.Sleep(10 * time.Millisecond)
	}
	transient.Store(false)
	if _, err := q.Retry(ctx, res[1].ID); err != nil {
		t.Fatal(err)
	}
	waitFinal(t, q, IDs(res[1:2]))
	if j, _ = q.Get(ctx, res[1].ID); j.State != "completed" || j.Attempt < 2 {
		t.Fatalf("after retry: %+v", j)
	}
	// Cancel the item that runs until told to stop.
	for {
		if j, _ = q.Get(ctx, res[2].ID); j.State == "running" {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := q.Cancel(ctx, res[2].ID); err != nil {
		t.Fatal(err)
	}
	waitFinal(t, q, IDs(res[2:]))
	if j, _ = q.Get(ctx, res[2].ID); j.State != "cancelled" {
		t.Fatalf("cancelled: %+v", j)
	}
	// Retry brings the cancelled permanent failure back.
	if j, err = q.Retry(ctx, res[0].ID); err != nil || j.State != "available" {
		t.Fatalf("retry cancelled: %+v %v", j, err)
	}
	counts, err := q.Counts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if counts["completed"] != 1 || counts["cancelled"]+counts["available"]+counts["running"] != 2 {
		t.Fatalf("counts = %v", counts)
	}
}

func testReap(t *testing.T, b backend) {
	s := setup(t, b, 1)
	release := make(chan struct{})
	started := make(chan struct{}, 1)
	dying := open(t, s.url, func(ctx context.Context, a ItemArgs) error {
		started <- struct{}{}
		select {
		case <-release:
		case <-ctx.Done():
		}
		return errors.New("gave up")
	})
	ctx := context.Background()
	res, err := dying.Enqueue(ctx, s.job)
	if err != nil {
		t.Fatal(err)
	}
	if err := dying.Start(ctx); err != nil {
		t.Fatal(err)
	}
	<-started
	// A live holder is left alone.
	survivor := open(t, s.url, writeImage)
	if n, err := survivor.Reap(ctx); err != nil || n != 0 {
		t.Fatalf("reap with the holder alive: %d %v", n, err)
	}
	// The holder "dies": its liveness lock goes, as when the kernel or the
	// server drops it.
	// The server drops a closed session's locks a moment later.
	dying.live.close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		n, err := survivor.Reap(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if n == 1 {
			break
		}
		if n != 0 || time.Now().After(deadline) {
			t.Fatalf("reap after the holder died: %d", n)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Requeued: available, or already fetched again (the "dead" holder's
	// client still polls, every 20 ms here), which starts attempt 2.
	j, _ := survivor.Get(ctx, res[0].ID)
	if j.State != "available" && !(j.State == "running" && j.Attempt == 2) {
		t.Fatalf("reaped job: %+v", j)
	}
	close(release)
	if b.name == "sqlite" {
		// A lock file of a dead process is swept by the next one to open.
		dir := strings.TrimPrefix(s.url, "sqlite://") + ".workers"
		stale := filepath.Join(dir, "tessera-1-dead.lock")
		os.WriteFile(stale, nil, 0o644)
		open(t, s.url, writeImage)
		if _, err := os.Stat(stale); !os.IsNotExist(err) {
			t.Errorf("stale lock file not swept: %v", err)
		}
	}
}

func testConcurrentOpen(t *testing.T, b backend) {
	url := b.url(t)
	errs := make(chan error, 4)
	for i := 0; i < 4; i++ {
		go func() {
			q, err := OpenQueue(context.Background(), QueueOptions{URL: url})
			if err == nil {
				_, err = q.Counts(context.Background())
				q.Close()
			}
			errs <- err
		}()
	}
	for i := 0; i < 4; i++ {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

// UnfinishedOutputs (counted in the database) names the outputs List would
// give for the job's unfinished items: not another job's, not a cancelled one.
func testUnfinishedOutputs(t *testing.T, b backend) {
	s := setup(t, b, 4)
	q := open(t, s.url, nil)
	ctx := context.Background()
	res, err := q.Enqueue(ctx, s.job)
	if err != nil {
		t.Fatal(err)
	}
	other := &Job{Name: "other", Root: s.out, Items: []pipeline.Item{s.job.Items[0]}, Plans: []pipeline.Plan{testPlan}}
	other.Items[0].Output = filepath.Join(s.out, "other.png")
	if _, err := q.Enqueue(ctx, other); err != nil {
		t.Fatal(err)
	}
	if _, err := q.Cancel(ctx, res[1].ID); err != nil {
		t.Fatal(err)
	}
	got, err := q.UnfinishedOutputs(ctx, "t")
	if err != nil {
		t.Fatal(err)
	}
	open, err := q.List(ctx, unfinished...)
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, j := range open {
		if j.Job == "t" {
			want = append(want, j.Output)
		}
	}
	slices.Sort(got)
	slices.Sort(want)
	if len(got) != 3 || !slices.Equal(got, want) {
		t.Errorf("unfinished outputs %q, want %q (3: one of 4 cancelled)", got, want)
	}
	if none, err := q.UnfinishedOutputs(ctx, "nothing"); err != nil || len(none) != 0 {
		t.Errorf("a job with no items: %q, %v", none, err)
	}
}

// headerPNG writes the header of a w×h PNG and nothing else: enough for the
// planner, which reads sizes from headers.
func headerPNG(t *testing.T, path string, w, h int) {
	t.Helper()
	var ihdr [13]byte
	binary.BigEndian.PutUint32(ihdr[0:], uint32(w))
	binary.BigEndian.PutUint32(ihdr[4:], uint32(h))
	ihdr[8], ihdr[9] = 8, 2 // 8-bit RGB
	chunk := func(typ string, data []byte) []byte {
		var b bytes.Buffer
		binary.Write(&b, binary.BigEndian, uint32(len(data)))
		b.WriteString(typ)
		b.Write(data)
		binary.Write(&b, binary.BigEndian, crc32.ChecksumIEEE(append([]byte(typ), data...)))
		return b.Bytes()
	}
	data := append([]byte("\x89PNG\r\n\x1a\n"), chunk("IHDR", ihdr[:])...)
	if err := os.WriteFile(path, append(data, chunk("IEND", nil)...), 0o644); err != nil {
		t.Fatal(err)
	}
}

// An upscale's timeout comes from its real plan, made at submit from the
// input's header: a 1024² input at ×4 is hundreds of tile steps, and its
// attempt is given queue.item_timeout plus queue.tile_timeout for each
// (the old estimate, blind to the input's size, gave it 40). With a small
// per-tile knob the item that works for most of its plan's time is not
// cancelled, and one that outlives it is, with a reason that says so.
func testTimeoutFromPlan(t *testing.T, b backend) {
	dir := t.TempDir()
	headerPNG(t, filepath.Join(dir, "big.png"), 1024, 1024)
	path := filepath.Join(dir, "up.yaml")
	os.WriteFile(path, []byte("version: 1\nitems:\n  - {image: big.png, scale: 4, seeds: [1, 2], sr: {model: demo-sr, steps: 20, strength: 1}}\n"), 0o644)
	cfg := testConfig(dir)
	job, err := LoadChecked(path, cfg, testModels())
	if err != nil {
		t.Fatal(err)
	}
	steps := job.Plans[0].TileSteps()
	if it := job.Items[0]; it.InputWidth != 1024 || it.Width != 4096 || steps <= 280 || job.Plans[0].Stages[0].Width != 4096 {
		t.Fatalf("item %+v, plan %+v (%d tile steps)", it, job.Plans[0], steps)
	}
	const perTile = 100 * time.Microsecond
	budget := time.Millisecond + time.Duration(steps)*perTile // the attempt's timeout
	deadlines := make(chan time.Duration, 2)
	q, err := OpenQueue(context.Background(), QueueOptions{URL: b.url(t), Workers: 2, PollEvery: 20 * time.Millisecond,
		ItemTimeout: time.Millisecond, TileTimeout: perTile,
		Run: func(ctx context.Context, a ItemArgs) error {
			d, _ := ctx.Deadline()
			select {
			case deadlines <- time.Until(d): // the first attempts'
			default:
			}
			if a.Item.Seed == 1 {
				time.Sleep(budget * 6 / 10) // most of its time, well past 40 tile steps' worth
				return ctx.Err()
			}
			<-ctx.Done() // outlives its plan
			return ctx.Err()
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	w := &itemWorker{q: q}
	if got := w.Timeout(&river.Job[ItemArgs]{Args: NewItemArgs(job.Name, job.Items[0], job.Plans[0], job.Root)}); got != 2*budget {
		t.Errorf("River's timeout %s, want twice %s", got, budget)
	}
	res, err := q.Enqueue(context.Background(), job)
	if err != nil {
		t.Fatal(err)
	}
	if err := q.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if d := <-deadlines; d > budget || d < budget*8/10 {
			t.Errorf("attempt deadline in %s, want about %s", d, budget)
		}
	}
	waitFinal(t, q, IDs(res[:1]))
	deadline := time.Now().Add(10 * time.Second)
	for {
		j, _ := q.Get(context.Background(), res[1].ID)
		if j.Error != "" { // retried with this reason (running again, perhaps)
			if j.Final() || !strings.Contains(j.Error, "timed out after") || !strings.Contains(j.Error, fmt.Sprintf("× %d tile evaluations", steps)) {
				t.Errorf("timed-out item's reason: %q", j.Error)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the item that outlives its plan: %+v", j)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if j, _ := q.Get(context.Background(), res[0].ID); j.State != "completed" {
		t.Errorf("the item within its plan's time: %+v", j)
	}
}
