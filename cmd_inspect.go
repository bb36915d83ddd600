package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"tessera/models"
	"tessera/onnx"
)

// inspection is what `tessera inspect --json` prints.
type inspection struct {
	Model           string           `json:"model"`
	Path            string           `json:"path,omitempty"`
	Producer        string           `json:"producer"`
	ProducerVersion string           `json:"producer_version,omitempty"`
	IRVersion       int64            `json:"ir_version"`
	Opsets          map[string]int64 `json:"opsets"`
	ExternalData    []string         `json:"external_data,omitempty"`
	RolesFrom       string           `json:"roles_from"` // manifest, diffusers, diffusers+manifest or guessed
	Kind            string           `json:"kind"`
	Prediction      string           `json:"prediction,omitempty"`
	Manifest        *onnx.Manifest   `json:"manifest,omitempty"`
	Inputs          []onnx.IO        `json:"inputs"`
	Outputs         []onnx.IO        `json:"outputs"`
	Contract        onnx.Contract    `json:"contract"`
	Probe           *probeResult     `json:"probe,omitempty"`
}

// probeResult is one Run of the model on the configured providers.
type probeResult struct {
	Provider string   `json:"provider"`
	Skipped  []string `json:"skipped,omitempty"`
	Input    []int64  `json:"input"`
	Seconds  float64  `json:"seconds"`
}

// probeModel runs the model once on a small input built from its roles.
func probeModel(env *onnx.Env, m *onnx.Model) (*probeResult, error) {
	s, err := env.NewSession(m, onnx.SessionOptions{})
	if err != nil {
		return nil, err
	}
	defer s.Close()
	size := int64(64)
	if m.Manifest != nil && len(m.Manifest.NativeSize) == 2 && m.Kind == onnx.KindBase {
		size = int64(m.Manifest.NativeSize[0])
	}
	inputs := map[string]onnx.Tensor{}
	var sampleShape []int64
	for _, io := range m.Inputs {
		shape := make([]int64, len(io.Shape))
		for i, d := range io.Shape {
			switch {
			case d > 0:
				shape[i] = d
			case i == 0:
				shape[i] = 1
			case len(io.Shape) == 4 && i == 1:
				shape[i] = probeChannels(m, io.Role)
			case len(io.Shape) == 4:
				shape[i] = size
			case len(io.Shape) == 3 && i == 1:
				shape[i] = 77
			case m.Manifest != nil && m.Manifest.ContextDim > 0:
				shape[i] = int64(m.Manifest.ContextDim)
			default:
				shape[i] = 768
			}
		}
		n := int64(1)
		for _, d := range shape {
			n *= d
		}
		t := onnx.Tensor{Shape: shape}
		switch io.Role {
		case onnx.RoleClass:
			t.Int = make([]int64, n)
		case onnx.RoleTimestep:
			t.Float = fill(n, 500)
		case onnx.RoleNoiseLevel:
			t.Float = fill(n, 0.1)
			if io.Type == onnx.Int64 || io.Type == onnx.Int32 {
				t.Float, t.Int = nil, make([]int64, n)
			}
		default:
			t.Float = make([]float32, n)
		}
		if io.Role == onnx.RoleSample {
			sampleShape = shape
		}
		inputs[io.Name] = t
	}
	start := time.Now()
	if _, err := s.Run(inputs); err != nil {
		return nil, err
	}
	pr := &probeResult{Provider: s.Provider(), Input: sampleShape, Seconds: time.Since(start).Seconds()}
	for _, sk := range s.Skipped() {
		pr.Skipped = append(pr.Skipped, sk.Provider+": "+sk.Reason)
	}
	return pr, nil
}

// probeChannels is the channel count of a 4-D input whose channels are
// dynamic: from the manifest (the sample's C, or C + L when the low-res
// image is concatenated; the low-res input's L), else 3.
func probeChannels(m *onnx.Model, role string) int64 {
	man := m.Manifest
	if man == nil {
		return 3
	}
	switch {
	case role == onnx.RoleSample && man.LowresConcat:
		return int64(man.Channels + man.Lowres())
	case role == onnx.RoleLowres:
		return int64(man.Lowres())
	}
	return int64(man.Channels)
}

func fill(n int64, v float32) []float32 {
	out := make([]float32, n)
	for i := range out {
		out[i] = v
	}
	return out
}

func newInspectCmd(a *app) *cobra.Command {
	var asJSON, probe bool
	cmd := &cobra.Command{
		Use:   "inspect MODEL",
		Short: "Describe a model: inputs, outputs, roles, and whether it fits the base or SR contract",
		Long: `Inspect describes an ONNX model: its inputs and outputs (name, element type,
shape with ? for dynamic dimensions), the diffusion role of each (from the
tessera.yaml manifest beside the model, or guessed from conventional names
and shapes), producer and opset, and whether it fits the contract of a base
or super-resolution stage, with every reason when it does not.

MODEL is an embedded model (demo-base, demo-sr), a name in models.dirs, or a
path to a .onnx file or a directory holding model.onnx.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			env, err := onnx.Open(a.cfg.Runtime, a.logger)
			if err != nil {
				return err
			}
			defer env.Close()
			r := models.Resolver{Dirs: a.cfg.Models.Dirs, AllowPaths: true}
			m, err := r.Resolve(env, args[0])
			if err != nil {
				return fail(2, "%s", oneLine(err))
			}
			ins := describe(m)
			if probe {
				pr, err := probeModel(env, m)
				if err != nil {
					return fail(1, "probe %s: %s", m.Name, oneLine(err))
				}
				ins.Probe = pr
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(ins)
			}
			printInspection(cmd.OutOrStdout(), ins)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	cmd.Flags().BoolVar(&probe, "probe", false, "also create a session on the configured providers and time one Run")
	return cmd
}

func oneLine(err error) string {
	return strings.Join(strings.Fields(err.Error()), " ")
}

func describe(m *onnx.Model) inspection {
	ins := inspection{
		Model: m.Name, Path: m.Path,
		Producer: m.Header.ProducerName, ProducerVersion: m.Header.ProducerVersion,
		IRVersion: m.Header.IRVersion, Opsets: m.Header.Opsets, ExternalData: m.Header.ExternalData,
		RolesFrom: "guessed", Kind: m.Kind, Manifest: m.Manifest,
		Inputs: m.Inputs, Outputs: m.Outputs, Contract: m.CheckContract(),
	}
	if m.Manifest != nil {
		ins.RolesFrom = "manifest"
		ins.Prediction = m.Manifest.Prediction
		fromConfigs, fromYAML := false, false
		for _, f := range m.Manifest.Facts {
			if strings.HasPrefix(f.From, onnx.ManifestFile) {
				fromYAML = true
			} else {
				fromConfigs = true
			}
		}
		switch {
		case fromConfigs && fromYAML:
			ins.RolesFrom = "diffusers+manifest"
		case fromConfigs:
			ins.RolesFrom = "diffusers"
		}
	}
	return ins
}

func printInspection(w io.Writer, ins inspection) {
	fmt.Fprintf(w, "model:     %s\n", ins.Model)
	fmt.Fprintf(w, "producer:  %s %s (IR %d, opset %d)\n", ins.Producer, ins.ProducerVersion, ins.IRVersion, ins.Opsets[""])
	if len(ins.ExternalData) > 0 {
		fmt.Fprintf(w, "external:  %s\n", strings.Join(ins.ExternalData, ", "))
	}
	if ins.Manifest != nil {
		man := ins.Manifest
		switch ins.RolesFrom {
		case "diffusers":
			fmt.Fprintf(w, "roles:     from the diffusers configs (no %s)\n", onnx.ManifestFile)
		case "diffusers+manifest":
			fmt.Fprintf(w, "roles:     from the diffusers configs, with %s over them\n", onnx.ManifestFile)
		default:
			fmt.Fprintf(w, "roles:     from %s\n", onnx.ManifestFile)
		}
		fmt.Fprintf(w, "kind:      %s, prediction %s, channels %d, size multiple %d", man.Kind, man.Prediction, man.Channels, man.SizeMultiple)
		if man.Kind == onnx.KindSR {
			fmt.Fprintf(w, ", scale %d", man.Scale)
		} else if len(man.NativeSize) == 2 {
			fmt.Fprintf(w, ", native %dx%d", man.NativeSize[1], man.NativeSize[0])
			if f := man.DecodeFactor; man.Space == onnx.SpaceLatent && f > 0 {
				fmt.Fprintf(w, " latents (%dx%d pixels)", man.NativeSize[1]*f, man.NativeSize[0]*f)
			}
		}
		if man.ReceptiveField > 0 {
			fmt.Fprintf(w, ", receptive field %d", man.ReceptiveField)
		}
		fmt.Fprintln(w)
		if man.Description != "" {
			fmt.Fprintf(w, "about:     %s\n", man.Description)
		}
		// One line per family fact, with where it came from.
		for _, f := range man.Facts {
			fmt.Fprintf(w, "  %-16s %s  (%s)\n", f.Key+":", f.Value, f.From)
		}
		for _, c := range man.Conflicts {
			fmt.Fprintf(w, "  conflict:        %s\n", c)
		}
	} else {
		fmt.Fprintf(w, "roles:     guessed from names and shapes (add a tessera.yaml beside the model to declare them)\n")
		fmt.Fprintf(w, "kind:      %s (guessed)\n", ins.Kind)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "\tNAME\tTYPE\tSHAPE\tROLE")
	for _, io := range ins.Inputs {
		fmt.Fprintf(tw, "input\t%s\t%s\t%s\t%s\n", io.Name, io.Type, io.ShapeString(), orDash(io.Role))
	}
	for _, io := range ins.Outputs {
		fmt.Fprintf(tw, "output\t%s\t%s\t%s\t%s\n", io.Name, io.Type, io.ShapeString(), orDash(io.Role))
	}
	tw.Flush()
	if p := ins.Probe; p != nil {
		fmt.Fprintf(w, "probe:     one Run at %v on %s in %.1f ms\n", p.Input, p.Provider, 1000*p.Seconds)
		for _, sk := range p.Skipped {
			fmt.Fprintf(w, "           skipped %s\n", sk)
		}
	}
	if ins.Contract.Fits {
		fmt.Fprintf(w, "contract:  fits the %s contract\n", ins.Contract.Kind)
		return
	}
	fmt.Fprintf(w, "contract:  does not fit the %s contract:\n", ins.Contract.Kind)
	for _, p := range ins.Contract.Problems {
		fmt.Fprintf(w, "  - %s\n", p)
	}
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
