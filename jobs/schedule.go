package jobs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/robfig/cron/v3"

	"tessera/config"
)

// cronParser reads standard five-field specs and descriptors (@hourly,
// @daily, @every 30s).
var cronParser = cron.NewParser(cron.Minute | cron.Hour | cron.Dom | cron.Month | cron.Dow | cron.Descriptor)

// ParseCron parses a cron spec: five fields (minute hour day-of-month month
// day-of-week) or a descriptor. "@every D" fires at the multiples of D
// since the zero time, so that every process, and a process after a
// restart, computes the same firing times; D must be at least a second.
// It never panics: a spec that makes the parser panic is an error.
func ParseCron(spec string) (s cron.Schedule, err error) {
	defer func() {
		if p := recover(); p != nil {
			s, err = nil, fmt.Errorf("invalid cron spec %q", spec)
		}
	}()
	spec = strings.TrimSpace(spec)
	if spec == "" {
		return nil, errors.New("empty cron spec")
	}
	if rest, ok := strings.CutPrefix(spec, "@every "); ok {
		d, err := time.ParseDuration(strings.TrimSpace(rest))
		if err != nil {
			return nil, fmt.Errorf("cron spec %q: %w", spec, err)
		}
		if d < time.Second {
			return nil, fmt.Errorf("cron spec %q: the interval must be at least 1s", spec)
		}
		return everySchedule{d}, nil
	}
	s, err = cronParser.Parse(spec)
	if err != nil {
		return nil, fmt.Errorf("cron spec %q: %w", spec, err)
	}
	return s, nil
}

// everySchedule fires at the multiples of d.
type everySchedule struct{ d time.Duration }

func (e everySchedule) Next(t time.Time) time.Time { return t.Truncate(e.d).Add(e.d) }

// ScheduleQueue is what a Scheduler uses of the queue; *Queue has it.
type ScheduleQueue interface {
	Enqueue(ctx context.Context, job *Job) ([]Enqueued, error)
	UnfinishedOutputs(ctx context.Context, job string) ([]string, error)
}

var _ ScheduleQueue = (*Queue)(nil)

// SchedulerOptions configure a Scheduler.
type SchedulerOptions struct {
	Schedules []config.Schedule
	Queue     ScheduleQueue
	// Load parses the job file at path as of now (which fills the {date}
	// and {time} fields of its outputs).
	Load   func(path string, now time.Time) (*Job, error)
	Logger *slog.Logger
}

// Scheduler enqueues the items of job files at cron times. A firing at
// time T parses the job file with now = T, so its outputs name T; queue
// items are unique by content and output, so a firing at T repeated by a
// restarted process or by another process on the same queue adds nothing.
// A firing is skipped while items of an earlier firing of the same job
// are unfinished, so that runs never overlap.
type Scheduler struct {
	opts    SchedulerOptions
	entries []*scheduleEntry
}

type scheduleEntry struct {
	config.Schedule
	sched cron.Schedule
	loc   *time.Location
	stats ScheduleStats
}

// ScheduleStats count the firings of one schedule.
type ScheduleStats struct {
	Name string
	// Fired counts firings that enqueued new items.
	Fired atomic.Int64
	// Duplicate counts firings whose items the queue already held: the same
	// time fired by another process, or before a restart.
	Duplicate atomic.Int64
	// Skipped counts firings skipped because an earlier one was unfinished.
	Skipped atomic.Int64
	// Failed counts firings whose job file did not load or whose items
	// could not be enqueued.
	Failed atomic.Int64
}

// NewScheduler checks every schedule: its spec, its time zone and its job
// file (loaded once). The error names each bad key, schedules[i].cron.
func NewScheduler(opts SchedulerOptions) (*Scheduler, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	s := &Scheduler{opts: opts}
	var problems []string
	for i, sc := range opts.Schedules {
		key := fmt.Sprintf("schedules[%d]", i)
		e := &scheduleEntry{Schedule: sc, loc: time.Local}
		e.stats.Name = sc.Name
		var err error
		if e.sched, err = ParseCron(sc.Cron); err != nil {
			problems = append(problems, fmt.Sprintf("%s.cron: %v", key, err))
		}
		if sc.TZ != "" {
			if e.loc, err = time.LoadLocation(sc.TZ); err != nil {
				problems = append(problems, fmt.Sprintf("%s.tz: unknown time zone %q", key, sc.TZ))
			}
		}
		if opts.Load != nil {
			if _, err := opts.Load(sc.Job, time.Now()); err != nil {
				problems = append(problems, fmt.Sprintf("%s.job: %v", key, err))
			}
		}
		s.entries = append(s.entries, e)
	}
	if len(problems) > 0 {
		return nil, errors.New(strings.Join(problems, "; "))
	}
	if opts.Queue == nil || opts.Load == nil {
		return nil, errors.New("schedules: Queue and Load are required")
	}
	return s, nil
}

// Stats returns the counters of every schedule, in configuration order.
func (s *Scheduler) Stats() []*ScheduleStats {
	out := make([]*ScheduleStats, len(s.entries))
	for i, e := range s.entries {
		out[i] = &e.stats
	}
	return out
}

// Next is when the i-th schedule fires next after t.
func (s *Scheduler) Next(i int, t time.Time) time.Time {
	return s.entries[i].sched.Next(t.In(s.entries[i].loc))
}

// Run fires the schedules until ctx ends, then waits for firings in
// progress. Firings missed while no process ran are not made up.
func (s *Scheduler) Run(ctx context.Context) {
	var wg sync.WaitGroup
	for i, e := range s.entries {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				next := s.Next(i, time.Now())
				t := time.NewTimer(time.Until(next))
				select {
				case <-ctx.Done():
					t.Stop()
					return
				case <-t.C:
				}
				s.fire(ctx, e, next)
			}
		}()
	}
	<-ctx.Done()
	wg.Wait()
}

// fire enqueues the items of one firing at T, unless an earlier firing of
// the same job has unfinished items.
func (s *Scheduler) fire(ctx context.Context, e *scheduleEntry, at time.Time) {
	log := s.opts.Logger.With("schedule", e.Name, "at", at.Format(time.RFC3339))
	defer func() {
		if p := recover(); p != nil {
			e.stats.Failed.Add(1)
			log.Error("schedule: firing failed (panic)", "panic", p)
		}
	}()
	job, err := s.opts.Load(e.Job, at)
	if err != nil {
		e.stats.Failed.Add(1)
		log.Error("schedule: load job file", "err", err)
		return
	}
	ctx = context.WithoutCancel(ctx) // a firing that began is finished
	open, err := s.opts.Queue.UnfinishedOutputs(ctx, job.Name)
	if err != nil {
		e.stats.Failed.Add(1)
		log.Error("schedule: list unfinished items", "err", err)
		return
	}
	mine := make(map[string]bool, len(job.Items))
	for _, it := range job.Items {
		mine[it.Output] = true
	}
	busy := 0
	for _, out := range open {
		if !mine[out] {
			busy++
		}
	}
	if busy > 0 {
		e.stats.Skipped.Add(1)
		log.Warn("schedule: skipped; an earlier firing is unfinished", "job", job.Name, "unfinished", busy)
		return
	}
	res, err := s.opts.Queue.Enqueue(ctx, job)
	if err != nil {
		e.stats.Failed.Add(1)
		log.Error("schedule: enqueue", "err", err)
		return
	}
	added := 0
	for _, r := range res {
		if !r.Duplicate {
			added++
		}
	}
	if added == 0 {
		e.stats.Duplicate.Add(1)
		log.Info("schedule: this firing was already queued (by another process or before a restart)", "job", job.Name)
		return
	}
	e.stats.Fired.Add(1)
	log.Info("schedule: fired", "job", job.Name, "items", added)
}
