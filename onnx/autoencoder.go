package onnx

import (
	"fmt"
	"os"
	"path/filepath"
)

// Autoencoder is a latent model's autoencoder as diffusers and Optimum lay
// it out: vae_decoder/model.onnx (latent_sample [B,C,h,w] → sample
// [B,3,h·F,w·F]) and, where exported, vae_encoder/model.onnx, with the
// AutoencoderKL or VQModel config.json beside them.
type Autoencoder struct {
	Class          string  `json:"class"`           // AutoencoderKL or VQModel
	LatentChannels int     `json:"latent_channels"` // C
	Factor         int     `json:"factor"`          // F: 2^(len(block_out_channels)−1)
	ScalingFactor  float64 `json:"scaling_factor"`  // latents are divided by it before decoding
	ShiftFactor    float64 `json:"shift_factor,omitempty"`
	Decoder        string  `json:"decoder"`           // the decoder's model.onnx
	Encoder        string  `json:"encoder,omitempty"` // the encoder's, "" where none
}

// autoencoderConfig is what Tessera reads of an autoencoder's config.json.
type autoencoderConfig struct {
	ClassName        string   `json:"_class_name"`
	LatentChannels   *int     `json:"latent_channels"`
	VQEmbedDim       *int     `json:"vq_embed_dim"`
	BlockOutChannels []int    `json:"block_out_channels"`
	ScalingFactor    *float64 `json:"scaling_factor"`
	ShiftFactor      *float64 `json:"shift_factor"`
}

// IsAutoencoderConfig reports whether dir's config.json describes an
// autoencoder (AutoencoderKL, VQModel).
func IsAutoencoderConfig(dir string) bool {
	var c autoencoderConfig
	ok, err := readJSON(filepath.Join(dir, "config.json"), &c)
	return ok && err == nil && (c.ClassName == "AutoencoderKL" || c.ClassName == "VQModel")
}

// ReadAutoencoder describes the autoencoder of dir: a pipeline folder
// holding vae_decoder/ (and vae_encoder/), or the vae_decoder/ folder itself.
func ReadAutoencoder(dir string) (*Autoencoder, error) {
	dec := dir
	if _, err := os.Stat(filepath.Join(dir, "vae_decoder", "model.onnx")); err == nil {
		dec = filepath.Join(dir, "vae_decoder")
	}
	var c autoencoderConfig
	cfgPath := filepath.Join(dec, "config.json")
	ok, err := readJSON(cfgPath, &c)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("%s: no config.json", dec)
	}
	a := &Autoencoder{Class: c.ClassName, Decoder: filepath.Join(dec, "model.onnx")}
	switch c.ClassName {
	case "AutoencoderKL":
		a.ScalingFactor = 0.18215 // diffusers' default
	case "VQModel":
		a.ScalingFactor = 1
	default:
		return nil, fmt.Errorf("%s: _class_name %q is not an autoencoder (want AutoencoderKL or VQModel)", cfgPath, c.ClassName)
	}
	switch {
	case c.LatentChannels != nil:
		a.LatentChannels = *c.LatentChannels
	case c.VQEmbedDim != nil:
		a.LatentChannels = *c.VQEmbedDim
	}
	if c.VQEmbedDim != nil && c.ClassName == "VQModel" {
		a.LatentChannels = *c.VQEmbedDim
	}
	if a.LatentChannels < 1 || a.LatentChannels > 1024 {
		return nil, fmt.Errorf("%s: latent_channels %d", cfgPath, a.LatentChannels)
	}
	if n := len(c.BlockOutChannels); n < 1 || n > 8 {
		return nil, fmt.Errorf("%s: block_out_channels %v", cfgPath, c.BlockOutChannels)
	}
	a.Factor = 1 << (len(c.BlockOutChannels) - 1)
	// A VQ decoder takes its latents unscaled (LDMSuperResolutionPipeline
	// decodes them as the U-Net makes them), whatever scaling_factor a
	// re-saved config holds.
	if c.ScalingFactor != nil && c.ClassName != "VQModel" {
		a.ScalingFactor = *c.ScalingFactor
	}
	if !(a.ScalingFactor > 0) {
		return nil, fmt.Errorf("%s: scaling_factor %g", cfgPath, a.ScalingFactor)
	}
	if c.ShiftFactor != nil {
		a.ShiftFactor = *c.ShiftFactor
	}
	if _, err := os.Stat(a.Decoder); err != nil {
		return nil, fmt.Errorf("%s: %w", dec, err)
	}
	enc := filepath.Join(filepath.Dir(dec), "vae_encoder", "model.onnx")
	if _, err := os.Stat(enc); err == nil {
		a.Encoder = enc
	}
	return a, nil
}
