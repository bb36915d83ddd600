// Package stages holds Tessera's numeric building blocks for cascaded
// diffusion: plain functions and small types over float32 slices, planar
// C×H×W per image with image values in [−1, 1]. It starts no goroutines and
// imports nothing of the project; shapes are checked once at each boundary
// and errors returned, never panics.
//
// What it offers:
//
//   - Noise: Noise, a counter-based (Philox4x32-10, Box–Muller) generator of
//     standard normals, a pure function of (seed, stream, step, channel,
//     global y, global x); streams StreamBase, StreamSR, StreamAug,
//     StreamEta, and StageStream to separate cascade stages.
//   - Schedules: Betas (linear, scaled_linear, squaredcos_cap_v2),
//     AlphasCumprod, the timestep spacings of diffusers' DDIM, Euler and
//     DPM-Solver schedulers (TimestepsDDIM, TimestepsEuler,
//     TimestepsDPMSolver), Schedule, and SchedulerConfig read from a
//     diffusers scheduler_config.json (ParseSchedulerConfig,
//     ParseSchedulerConfigAs, SchedulerDefaults).
//   - Samplers: the Sampler interface with DDIM (eta), Euler (k-diffusion
//     sigmas, input scaling 1/√(σ²+1)) and DPMSolver2M (DPM-Solver++ 2M),
//     each for epsilon, v and sample predictions; PredToX0 and PredToEps
//     convert model outputs, so that tiles fuse in x0 space; Img2ImgStart and
//     AddNoise for img2img strength.
//   - Guidance: Guide and GuidePair (classifier-free guidance over a batched
//     uncond/cond pair) and RescaleGuidance (Lin et al. 2023).
//   - Conditioning: Resample (Lanczos or bicubic with imaging's kernels, in
//     float) and NoiseAugment / AugmentTimestep for SR noise conditioning.
//   - Tiling and stitching: TileGrid of equal tiles with halo and overlap,
//     Window weights (zero halo, Hann ramp, flat core), TileGrid.Extract with
//     reflection or zero padding, and Accumulator (weighted sum and weight,
//     normalised once).
//   - Images and PNG: TensorToNRGBA, TensorToNRGBA64, ImageToTensor;
//     EncodePNG and InsertTextChunks put a `parameters` tEXt chunk (A1111
//     form, FormatParameters) and a `tessera` iTXt JSON chunk right after
//     IHDR; ReadTextChunks, ReadPNGMetadata and ParseParameters read them
//     back.
//
// # Noise key layout
//
// Philox4x32-10 with key (seed & 0xffffffff, seed >> 32) and counter
//
//	(x/4, y, step, stream<<16 | channel)
//
// in global canvas coordinates. Each Philox call yields four 32-bit words;
// Box–Muller turns words (0, 1) into the normals at x = 4·(x/4)+0 and +1, and
// words (2, 3) into those at +2 and +3. Filling a tile therefore gives
// exactly the crop of the whole canvas, whatever the tiling. The stream is 16
// bits: the low byte names the purpose (StreamBase = 1, StreamSR = 2,
// StreamAug = 3, StreamEta = 4), the high byte the cascade stage
// (StageStream). Channels go up to 65535; step is the sampler step index.
//
// # Schedule shift
//
// Schedule.Shift = s (default 1, off) shifts every sampling noise level
// toward more noise: with the k-diffusion sigma σ = √((1−ᾱ)/ᾱ) of a step,
// the shifted sigma is σ' = s·σ, equivalently logSNR' = logSNR − 2·ln s with
// logSNR = ln(ᾱ/(1−ᾱ)). This is exactly the SD3 form σ_f' = s·σ_f/(1+(s−1)·σ_f)
// applied to the flow sigma σ_f = √(1−ᾱ)/(√ᾱ+√(1−ᾱ)) = σ/(1+σ). The sampler
// then runs at ᾱ' = 1/(1+σ'²) and feeds the model the fractional training
// timestep whose training sigma is σ' (log-sigma interpolation, clamped to
// [0, T−1], as diffusers' _sigma_to_t). DDIM shifts both levels of each step;
// the final targets (ᾱ = 1 or ᾱ_0, σ = 0) are shifted like any other level.
// Shift is a plain float64 so that the pipeline can record it.
//
// # Driving a sampler over tiles
//
// Per step i the pipeline gets t = s.Timestep(i), lv = s.Level(i) and
// scale = s.InputScale(i); for each tile it extracts the canvas x, scales it,
// runs the model (CFG pair in one batch, then Guide), converts the output
// with PredToX0(s.Prediction(), lv, input, output, x0tile) and adds x0tile to
// an Accumulator with the tile's window; the normalised Accumulator is the
// canvas x0, and s.Step(i, x, x0) advances the canvas once. The conversion is
// affine in the output with per-step coefficients and the normalised weights
// sum to one, so fusing x0 equals fusing raw outputs and converting after.
package stages
