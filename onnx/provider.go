package onnx

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	ort "github.com/yalue/onnxruntime_go"

	"tessera/config"
)

// ProviderError is returned when an execution provider cannot attach and the
// configuration does not allow falling back.
type ProviderError struct {
	Provider string
	Reason   string   // ONNX Runtime's own message
	Missing  []string // libraries that were looked for and not found
}

func (e *ProviderError) Error() string {
	msg := fmt.Sprintf("execution provider %s could not attach: %s", e.Provider, e.Reason)
	if len(e.Missing) > 0 {
		msg += "; missing libraries: " + strings.Join(e.Missing, ", ")
	}
	return msg + "; " + providerHint(e.Provider)
}

func providerHint(p string) string {
	switch p {
	case config.ProviderCUDA:
		return "install ONNX Runtime's GPU build (libonnxruntime_providers_shared.so and libonnxruntime_providers_cuda.so beside libonnxruntime) with the CUDA and cuDNN libraries it was built against, or set runtime.providers to [cpu] (or runtime.fallback: true to continue on the next provider)"
	case config.ProviderTensorRT:
		return "install ONNX Runtime's GPU build (libonnxruntime_providers_shared.so and libonnxruntime_providers_tensorrt.so beside libonnxruntime) with TensorRT, CUDA and cuDNN, or drop tensorrt from runtime.providers (or set runtime.fallback: true)"
	}
	return "check runtime.providers"
}

// providerLibraries are the libraries each GPU provider needs: the first
// group sits beside libonnxruntime, the second on the loader path (patterns).
var providerLibraries = map[string][2][]string{
	config.ProviderCUDA: {
		{"libonnxruntime_providers_shared.so", "libonnxruntime_providers_cuda.so"},
		{"libcudart.so*", "libcublas.so*", "libcublasLt.so*", "libcufft.so*", "libcudnn.so*"},
	},
	config.ProviderTensorRT: {
		{"libonnxruntime_providers_shared.so", "libonnxruntime_providers_tensorrt.so"},
		{"libnvinfer.so*", "libnvinfer_plugin.so*", "libnvonnxparser.so*", "libcudart.so*", "libcudnn.so*"},
	},
}

// missingLibraries lists what provider needs and cannot be found.
func missingLibraries(provider, ortLib string) []string {
	libs, ok := providerLibraries[provider]
	if !ok {
		return nil
	}
	var missing []string
	ortDir := filepath.Dir(ortLib)
	for _, name := range libs[0] {
		if _, err := os.Stat(filepath.Join(ortDir, name)); err != nil {
			missing = append(missing, name+" (in "+ortDir+")")
		}
	}
	dirs := append(loaderDirs(), ortDir, "/usr/local/cuda/lib64")
	for _, pattern := range libs[1] {
		found := false
		for _, d := range dirs {
			if m, _ := filepath.Glob(filepath.Join(d, pattern)); len(m) > 0 {
				found = true
				break
			}
		}
		if !found {
			missing = append(missing, strings.TrimSuffix(pattern, "*"))
		}
	}
	return missing
}

// attachProvider appends provider p to the session options.
func attachProvider(opts *ort.SessionOptions, p string, rt config.Runtime) error {
	switch p {
	case config.ProviderCPU:
		return nil // always present; ONNX Runtime places what others cannot run here
	case config.ProviderCUDA:
		o, err := ort.NewCUDAProviderOptions()
		if err != nil {
			return err
		}
		defer o.Destroy()
		c := rt.CUDA
		kv := map[string]string{
			"device_id":              strconv.Itoa(c.DeviceID),
			"arena_extend_strategy":  c.ArenaExtendStrategy,
			"cudnn_conv_algo_search": c.CUDNNConvAlgoSearch,
		}
		if c.GPUMemLimit > 0 {
			kv["gpu_mem_limit"] = strconv.FormatInt(c.GPUMemLimit, 10)
		}
		if err := o.Update(kv); err != nil {
			return err
		}
		return opts.AppendExecutionProviderCUDA(o)
	case config.ProviderTensorRT:
		o, err := ort.NewTensorRTProviderOptions()
		if err != nil {
			return err
		}
		defer o.Destroy()
		t := rt.TensorRT
		kv := map[string]string{
			"device_id":               strconv.Itoa(t.DeviceID),
			"trt_fp16_enable":         boolOpt(t.FP16),
			"trt_engine_cache_enable": boolOpt(t.EngineCache),
			"trt_timing_cache_enable": boolOpt(t.TimingCache),
		}
		if t.EngineCache && t.EngineCachePath != "" {
			kv["trt_engine_cache_path"] = t.EngineCachePath
		}
		if t.TimingCache && t.TimingCachePath != "" {
			kv["trt_timing_cache_path"] = t.TimingCachePath
		}
		if t.WorkspaceSize > 0 {
			kv["trt_max_workspace_size"] = strconv.FormatInt(t.WorkspaceSize, 10)
		}
		if err := o.Update(kv); err != nil {
			return err
		}
		return opts.AppendExecutionProviderTensorRT(o)
	}
	return fmt.Errorf("unknown execution provider %q", p)
}

func boolOpt(b bool) string {
	if b {
		return "1"
	}
	return "0"
}
