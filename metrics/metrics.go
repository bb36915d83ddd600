// Package metrics exposes what `tessera serve` does as Prometheus metrics,
// on a registry of its own.
package metrics

import (
	"context"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"tessera/jobs"
	"tessera/pipeline"
)

// Metrics holds the collectors of one serve process.
type Metrics struct {
	reg          *prometheus.Registry
	itemSeconds  *prometheus.HistogramVec
	stageSeconds *prometheus.HistogramVec
}

// durationBuckets span a tiny test item (tens of ms) to a large image
// (tens of minutes).
var durationBuckets = prometheus.ExponentialBuckets(0.01, 2.5, 14)

// New registers the item and stage histograms and the Go and process
// collectors.
func New() *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		itemSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "tessera_item_duration_seconds", Help: "Time to make one item, by outcome (ok, error).", Buckets: durationBuckets,
		}, []string{"outcome"}),
		stageSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "tessera_stage_duration_seconds", Help: "Time of one cascade stage of an item (base, sr1, sr2, ...).", Buckets: durationBuckets,
		}, []string{"stage"}),
	}
	m.reg.MustRegister(m.itemSeconds, m.stageSeconds,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Handler serves the registry in the Prometheus exposition format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}

// ObserveItem records one item's time.
func (m *Metrics) ObserveItem(d time.Duration, err error) {
	outcome := "ok"
	if err != nil {
		outcome = "error"
	}
	m.itemSeconds.WithLabelValues(outcome).Observe(d.Seconds())
}

// StageTimer times the stages of one item from its progress reports.
type StageTimer struct {
	m       *Metrics
	upscale bool // the item has no base stage
	stage   int
	start   time.Time
}

// StageTimer starts timing an item's stages; upscale items have no base
// stage.
func (m *Metrics) StageTimer(upscale bool) *StageTimer {
	return &StageTimer{m: m, upscale: upscale, stage: -1, start: time.Now()}
}

// Step notes a progress report; a change of stage ends the previous one.
func (t *StageTimer) Step(p pipeline.Progress) {
	if p.Stage == t.stage {
		return
	}
	now := time.Now()
	if t.stage >= 0 {
		t.m.stageSeconds.WithLabelValues(t.name(t.stage)).Observe(now.Sub(t.start).Seconds())
	}
	if t.stage < 0 {
		now = t.start // the first stage began with the item
	}
	t.stage, t.start = p.Stage, now
}

// Done ends the last stage of a successful item.
func (t *StageTimer) Done() {
	if t.stage >= 0 {
		t.m.stageSeconds.WithLabelValues(t.name(t.stage)).Observe(time.Since(t.start).Seconds())
		t.stage = -1
	}
}

func (t *StageTimer) name(stage int) string {
	if t.upscale {
		stage++ // an upscale has no base stage: its first stage is sr1
	} else if stage == 0 {
		return "base"
	}
	return "sr" + strconv.Itoa(stage)
}

// AddQueue exports the queue's items by state, its depth (items waiting
// to run) and whether it answered, read at each scrape.
func (m *Metrics) AddQueue(counts func(context.Context) (map[string]int, error)) {
	m.reg.MustRegister(&queueCollector{counts: counts})
}

var (
	itemsDesc = prometheus.NewDesc("tessera_queue_items", "Item jobs in the queue by state.", []string{"state"}, nil)
	depthDesc = prometheus.NewDesc("tessera_queue_depth", "Item jobs waiting to run (available, pending, scheduled, retryable).", nil, nil)
	upDesc    = prometheus.NewDesc("tessera_queue_up", "1 when the queue database answered the last scrape.", nil, nil)
)

type queueCollector struct {
	counts func(context.Context) (map[string]int, error)
}

func (c *queueCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- itemsDesc
	ch <- depthDesc
	ch <- upDesc
}

func (c *queueCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	counts, err := c.counts(ctx)
	if err != nil {
		ch <- prometheus.MustNewConstMetric(upDesc, prometheus.GaugeValue, 0)
		return
	}
	ch <- prometheus.MustNewConstMetric(upDesc, prometheus.GaugeValue, 1)
	depth := 0
	for state, n := range counts {
		ch <- prometheus.MustNewConstMetric(itemsDesc, prometheus.GaugeValue, float64(n), state)
		switch state {
		case "available", "pending", "scheduled", "retryable":
			depth += n
		}
	}
	ch <- prometheus.MustNewConstMetric(depthDesc, prometheus.GaugeValue, float64(depth))
}

// AddEngine exports ONNX Runtime's time (and busy time), Run calls, the tile
// rows evaluated and the lanes, by model and execution provider, read at
// scrape time.
func (m *Metrics) AddEngine(stats func() []pipeline.ModelStats) {
	m.reg.MustRegister(engineCollector(stats))
}

var (
	ortSecondsDesc = prometheus.NewDesc("tessera_ort_run_seconds_total", "Time inside ONNX Runtime Run.", []string{"model", "provider"}, nil)
	ortRunsDesc    = prometheus.NewDesc("tessera_ort_runs_total", "ONNX Runtime Run calls.", []string{"model", "provider"}, nil)
	tilesDesc      = prometheus.NewDesc("tessera_tiles_total", "Tile rows evaluated (one per tile per step).", []string{"model", "provider"}, nil)
	ortBusyDesc    = prometheus.NewDesc("tessera_ort_busy_seconds_total", "Run time divided by the model's lanes (Runs it may have in flight at once): with wall time, how busy the model was kept.", []string{"model", "provider"}, nil)
	lanesDesc      = prometheus.NewDesc("tessera_model_lanes", "Runs of the model that may execute at once.", []string{"model", "provider"}, nil)
)

type engineCollector func() []pipeline.ModelStats

func (c engineCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- ortSecondsDesc
	ch <- ortRunsDesc
	ch <- tilesDesc
	ch <- ortBusyDesc
	ch <- lanesDesc
}

func (c engineCollector) Collect(ch chan<- prometheus.Metric) {
	for _, s := range c() {
		ch <- prometheus.MustNewConstMetric(ortSecondsDesc, prometheus.CounterValue, s.RunSeconds, s.Model, s.Provider)
		ch <- prometheus.MustNewConstMetric(ortRunsDesc, prometheus.CounterValue, float64(s.Runs), s.Model, s.Provider)
		ch <- prometheus.MustNewConstMetric(tilesDesc, prometheus.CounterValue, float64(s.Rows), s.Model, s.Provider)
		ch <- prometheus.MustNewConstMetric(ortBusyDesc, prometheus.CounterValue, s.BusySeconds, s.Model, s.Provider)
		ch <- prometheus.MustNewConstMetric(lanesDesc, prometheus.GaugeValue, float64(s.Lanes), s.Model, s.Provider)
	}
}

// AddWatcher exports the files a watcher accepted and rejected.
func (m *Metrics) AddWatcher(w *jobs.Watcher) {
	labels := prometheus.Labels{"dir": w.Dir()}
	m.reg.MustRegister(
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "tessera_watch_accepted_total", Help: "Job files taken from a watched directory.", ConstLabels: labels},
			func() float64 { return float64(w.Accepted()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "tessera_watch_rejected_total", Help: "Job files moved to rejected/.", ConstLabels: labels},
			func() float64 { return float64(w.Rejected()) }),
	)
}

// AddScheduler exports each schedule's firings by outcome: fired (new
// items), duplicate (already queued by another process or before a
// restart), skipped (an earlier firing unfinished), failed.
func (m *Metrics) AddScheduler(s *jobs.Scheduler) {
	for _, st := range s.Stats() {
		for outcome, v := range map[string]func() int64{
			"fired": st.Fired.Load, "duplicate": st.Duplicate.Load, "skipped": st.Skipped.Load, "failed": st.Failed.Load,
		} {
			m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
				Name: "tessera_schedule_firings_total", Help: "Schedule firings by outcome.",
				ConstLabels: prometheus.Labels{"schedule": st.Name, "outcome": outcome},
			}, func() float64 { return float64(v()) }))
		}
	}
}
