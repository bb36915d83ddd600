package main

import (
	"context"
	"regexp"
	"strconv"
	"testing"
	"time"

	"tessera/jobs"
	"tessera/jobs/pgtest"
)

var madeRE = regexp.MustCompile(`(\d+) images made, (\d+) already done, (\d+) failed`)

// TestPostgresTwoWorkers has two processes share one batch through
// PostgreSQL: every item is made exactly once, by one of them.
func TestPostgresTwoWorkers(t *testing.T) { testTwoWorkers(t, pgtest.SchemaURL(t)) }

// TestSQLiteTwoWorkers is the same on one machine's SQLite file.
func TestSQLiteTwoWorkers(t *testing.T) { testTwoWorkers(t, "") }

func testTwoWorkers(t *testing.T, url string) {
	const items = 16
	e := newRunEnv(t, url)
	job := e.jobFile(t, "shared", items, 30)
	a := e.startRun(t, "-q", job)
	b := e.startRun(t, "-q", job)
	for name, r := range map[string]*bgRun{"a": a, "b": b} {
		if code := r.wait(t, 60*time.Second); code != 0 {
			t.Fatalf("worker %s exited %d:\n%s%s", name, code, r.out.String(), r.stderr())
		}
	}
	made := 0
	for _, r := range []*bgRun{a, b} {
		m := madeRE.FindStringSubmatch(r.out.String())
		if m == nil {
			t.Fatalf("no summary:\n%s", r.out.String())
		}
		n, err := strconv.Atoi(m[1])
		if err != nil {
			t.Fatal(err)
		}
		made += n
	}
	st := e.status(t)
	if made != items || st.Counts["completed"] != items {
		t.Fatalf("%d images made by the two workers, counts %v; want %d made once each", made, st.Counts, items)
	}
	e.checkOutputs(t, job)
}

// TestPostgresKilledWorkerRescued kills one of two workers mid-item: the
// other puts the item it held back in the queue and finishes the batch.
func TestPostgresKilledWorkerRescued(t *testing.T) {
	const items = 12
	e := newRunEnv(t, pgtest.SchemaURL(t))
	job := e.jobFile(t, "rescue", items, 60)
	victim := e.startRun(t, job)
	<-victim.started
	survivor := e.startRun(t, "-q", "--reap-every", "200ms", job)
	time.Sleep(30 * time.Millisecond)
	victim.cmd.Process.Kill()
	victim.wait(t, 10*time.Second)
	if code := survivor.wait(t, 60*time.Second); code != 0 {
		t.Fatalf("survivor exited %d:\n%s%s", code, survivor.out.String(), survivor.stderr())
	}
	st := e.status(t)
	if st.Counts["completed"] != items {
		t.Fatalf("counts %v", st.Counts)
	}
	e.checkOutputs(t, job)
	q, err := jobs.OpenQueue(context.Background(), jobs.QueueOptions{URL: e.queue})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	all, err := q.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	rescued := 0
	for _, j := range all {
		if j.Attempt > 1 {
			rescued++
		}
	}
	if rescued == 0 {
		t.Errorf("no item was taken over from the killed worker (none has a second attempt): %+v\nvictim:\n%s", all, victim.stderr())
	}
}
