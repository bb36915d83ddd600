package jobs

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"tessera/models"
	"tessera/pipeline"
	"testing"
	"time"

	"tessera/config"
)

func TestParseCron(t *testing.T) {
	for _, spec := range []string{"*/5 * * * *", "0 3 * * 1-5", "@hourly", "@daily", "@every 30s", "@every 1s", "@every 1h30m"} {
		if _, err := ParseCron(spec); err != nil {
			t.Errorf("ParseCron(%q): %v", spec, err)
		}
	}
	// Some of these make robfig/cron's parser panic (a time zone prefix
	// without a spec); all must be errors.
	for _, spec := range []string{"", "* * *", "61 * * * *", "* * * * * *", "@every 10ms", "@every x", "@yearlyish",
		"CRON_TZ=UTC", "TZ=", "CRON_TZ=Nowhere/City * * * * *", "*/0 * * * *", "5-1 * * * *", "1-2-3 * * * *"} {
		if _, err := ParseCron(spec); err == nil {
			t.Errorf("ParseCron(%q) accepted", spec)
		}
	}
}

func TestEveryIsAlignedAcrossProcesses(t *testing.T) {
	s, _ := ParseCron("@every 30s")
	base := time.Date(2030, 1, 1, 10, 0, 0, 0, time.UTC)
	want := base.Add(30 * time.Second)
	for _, started := range []time.Duration{0, time.Second, 12 * time.Second, 29*time.Second + 999*time.Millisecond} {
		if got := s.Next(base.Add(started)); !got.Equal(want) {
			t.Errorf("started at +%s: next %s, want %s", started, got, want)
		}
	}
}

func TestNewSchedulerNamesBadKeys(t *testing.T) {
	dir := t.TempDir()
	job := writeTickJob(t, dir)
	_, err := NewScheduler(SchedulerOptions{
		Schedules: []config.Schedule{
			{Name: "ok", Cron: "@every 1s", Job: job},
			{Name: "panics", Cron: "CRON_TZ=UTC", Job: job},
			{Name: "nojob", Cron: "@hourly", Job: filepath.Join(dir, "missing.yaml")},
		},
		Queue: nil,
		Load: func(path string, now time.Time) (*Job, error) {
			return LoadCheckedAt(path, "", testConfig(dir), now, testModels())
		},
	})
	if err == nil || !strings.Contains(err.Error(), "schedules[1].cron") || !strings.Contains(err.Error(), "schedules[2].job") || strings.Contains(err.Error(), "schedules[0]") {
		t.Fatalf("err = %v", err)
	}
}

func testConfig(dir string) config.Config {
	cfg := config.Default()
	cfg.Output.Root = filepath.Join(dir, "out")
	return cfg
}

// testModels describes the test fixtures' models (testdata/models) and the
// embedded demos, as a process's resolver does.
func testModels() pipeline.Describe {
	return models.Resolver{Dirs: []string{filepath.Join("..", "testdata", "models")}}.Manifests()
}

func writeTickJob(t *testing.T, dir string) string {
	t.Helper()
	path := filepath.Join(dir, "tick.yaml")
	body := `version: 1
output: "{job}/{date}/{time}/{index}.png"
defaults: {width: 64, height: 64, base: {model: oracle-base, steps: 4}, sr: {model: oracle-sr, steps: 2}}
items: [{count: 2, seed: 1}]
`
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestSchedulerFiresOnceAndNeverOverlaps fires as two processes would on
// one queue: the same time twice adds nothing; the next time is skipped
// while the first firing's items are unfinished (no worker runs here).
func TestSchedulerFiresOnceAndNeverOverlaps(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	q, err := OpenQueue(ctx, QueueOptions{URL: "sqlite://" + filepath.Join(dir, "q.db")})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	cfg := testConfig(dir)
	opts := SchedulerOptions{
		Schedules: []config.Schedule{{Name: "tick", Cron: "@every 1s", Job: writeTickJob(t, dir)}},
		Queue:     q,
		Load:      func(path string, now time.Time) (*Job, error) { return LoadCheckedAt(path, "", cfg, now, testModels()) },
	}
	a, err := NewScheduler(opts)
	if err != nil {
		t.Fatal(err)
	}
	b, err := NewScheduler(opts)
	if err != nil {
		t.Fatal(err)
	}
	at := time.Date(2030, 1, 1, 10, 0, 5, 0, time.UTC)
	a.fire(ctx, a.entries[0], at)
	b.fire(ctx, b.entries[0], at)
	sa, sb := a.Stats()[0], b.Stats()[0]
	if sa.Fired.Load() != 1 || sb.Fired.Load() != 0 || sb.Duplicate.Load() != 1 {
		t.Fatalf("a fired %d, b fired %d duplicate %d", sa.Fired.Load(), sb.Fired.Load(), sb.Duplicate.Load())
	}
	counts, _ := q.Counts(ctx)
	if counts["available"] != 2 {
		t.Fatalf("queue %v, want the 2 items of one firing", counts)
	}
	b.fire(ctx, b.entries[0], at.Add(time.Second))
	if sb.Skipped.Load() != 1 {
		t.Fatalf("b skipped %d, want the overlapping firing skipped", sb.Skipped.Load())
	}
	if counts, _ = q.Counts(ctx); counts["available"] != 2 {
		t.Fatalf("queue %v after a skipped firing", counts)
	}
}
