package pipeline

import (
	"context"
	"slices"
	"sync"
)

// aeRequest is one tile's Run of an autoencoder graph, waiting to be
// batched with the tiles of every item that decodes (or encodes) at the
// same time.
type aeRequest struct {
	ctx     context.Context
	in      []float32 // the tile's input, in (without the batch axis)
	in3     [3]int64  // its shape: channels, height, width
	out3    [3]int64  // the output's, with out3[0] the channels kept
	res     []float32 // the graph's whole output for the tile (outCh channels)
	err     error
	done    chan struct{}
	limited int // the caller's batch (the most tiles it wants in one Run)
}

// aeBatcher gathers tile Runs of one graph from every caller into Runs of
// up to the batch its callers ask for (the smallest of those waiting),
// halved for good while a Run of several tiles runs out of memory. It
// combines: a caller whose requests find no Run in progress runs batches
// (its own tiles and anyone's) until none is waiting, the others wait for
// their tiles. A cancelled caller's tiles are dropped from the batches;
// the Runs themselves are not cancelled, as they carry other callers'
// tiles (a Run is a few tiles: short).
type aeBatcher struct {
	mu      sync.Mutex
	pending []*aeRequest
	running bool
	limit   int // 0 until an out-of-memory halves it
}

// runTiles runs reqs (each tile's input set) through s, batched with what
// other callers have waiting, and returns when each has its result or
// error.
func (e *Engine) runTiles(ctx context.Context, s *aeSession, reqs []*aeRequest) error {
	b := &s.batcher
	for _, r := range reqs {
		r.ctx, r.done = ctx, make(chan struct{})
	}
	b.mu.Lock()
	b.pending = append(b.pending, reqs...)
	lead := !b.running
	b.running = true
	b.mu.Unlock()
	if lead {
		e.combine(s)
	}
	for _, r := range reqs {
		select {
		case <-r.done:
		case <-ctx.Done():
			return ctx.Err()
		}
		if r.err != nil {
			return r.err
		}
	}
	return nil
}

// combine runs batches of waiting requests until none is left.
func (e *Engine) combine(s *aeSession) {
	b := &s.batcher
	for {
		b.mu.Lock()
		// Cancelled callers' tiles leave the queue.
		b.pending = slices.DeleteFunc(b.pending, func(r *aeRequest) bool {
			if err := r.ctx.Err(); err != nil {
				r.err = err
				close(r.done)
				return true
			}
			return false
		})
		if len(b.pending) == 0 {
			b.running = false
			b.mu.Unlock()
			return
		}
		// The first waiting tile's shape, and every waiting tile of it, up
		// to the batch.
		first := b.pending[0]
		n := first.limited
		if b.limit > 0 {
			n = min(n, b.limit)
		}
		var batch, rest []*aeRequest
		for _, r := range b.pending {
			if len(batch) < n && r.in3 == first.in3 && r.out3 == first.out3 {
				batch = append(batch, r)
				n = min(n, max(r.limited, 1))
			} else {
				rest = append(rest, r)
			}
		}
		if len(batch) > n {
			rest = append(batch[n:], rest...)
			batch = batch[:n]
		}
		b.pending = rest
		b.mu.Unlock()

		per := int(first.in3[0] * first.in3[1] * first.in3[2])
		x := make([]float32, 0, len(batch)*per)
		for _, r := range batch {
			x = append(x, r.in...)
		}
		k := int64(len(batch))
		res, err := s.run(context.Background(), x, []int64{k, first.in3[0], first.in3[1], first.in3[2]}, []int64{k, first.out3[0], first.out3[1], first.out3[2]})
		if err != nil && isOutOfMemory(err) && len(batch) > 1 {
			// A Run of several tiles did not fit: halve, and the tiles wait
			// again at the front.
			b.mu.Lock()
			b.limit = max(len(batch)/2, 1)
			b.pending = append(batch, b.pending...)
			b.mu.Unlock()
			e.logger.Warn("autoencoder ran out of memory; batch halved", "graph", s.path, "batch", b.limit, "err", err)
			continue
		}
		got := 0
		if err == nil {
			got = len(res) / len(batch)
		}
		for i, r := range batch {
			if err != nil {
				r.err = err
			} else {
				r.res = res[i*got : (i+1)*got]
			}
			close(r.done)
		}
	}
}
