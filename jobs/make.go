package jobs

import (
	"context"

	"tessera/pipeline"
)

// Generator makes an item's image by its plan: the pipeline's Engine.
type Generator interface {
	Generate(ctx context.Context, it pipeline.Item, plan pipeline.Plan, progress func(pipeline.Progress)) (*pipeline.Result, error)
}

// MakeItem makes one queued item by the plan it was queued with and writes
// it under the root its output was resolved under: the way of an item is
// jobs (the queue) → pipeline (Generate) → jobs (Write). Errors keep their
// class (pipeline.Classify), which the queue's worker acts on.
func MakeItem(ctx context.Context, gen Generator, a ItemArgs, progress func(pipeline.Progress), o WriteOptions) error {
	if len(a.Plan.Stages) == 0 || a.Root == "" {
		return pipeline.Invalidf("the item has no plan or output root: it was queued by an older tessera; submit its job file again")
	}
	res, err := gen.Generate(ctx, a.Item, a.Plan, progress)
	if err != nil {
		return err
	}
	return Write(a.Root, a.Job, a.Item, res, o)
}
