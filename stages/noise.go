package stages

import (
	"fmt"
	"math"
)

// Stream names an independent family of noise drawn from one seed. Streams
// occupy the high 16 bits of the fourth Philox counter word, so two streams
// never share a counter and their values are independent.
type Stream uint16

// Noise streams agreed across the pipeline. A pipeline with several SR stages
// separates them with StageStream.
const (
	StreamBase Stream = 1 // initial noise of the base stage
	StreamSR   Stream = 2 // initial noise of an SR stage canvas
	StreamAug  Stream = 3 // noise-conditioning augmentation of the low-res input
	StreamEta  Stream = 4 // stochastic sampler noise (DDIM eta > 0)
)

// StageStream returns stream s specialised to cascade stage stage (0..255):
// the stage goes into the upper byte of the stream number.
func StageStream(s Stream, stage int) Stream {
	return Stream(uint16(s)&0xff | uint16(stage&0xff)<<8)
}

// Noise is a counter-based generator of standard-normal values: the value at
// (step, channel, y, x) is a pure function of (Seed, Stream, step, channel,
// y, x), so any region can be filled independently of any other and a tile
// equals the same crop of the whole canvas.
//
// Key layout (Philox4x32-10): key = (Seed low 32 bits, Seed high 32 bits);
// counter = (x/4, y, step, Stream<<16 | channel). One Philox call yields four
// 32-bit words, turned by Box–Muller into the four normals at x = 4·(x/4)+0..3.
type Noise struct {
	Seed   uint64
	Stream Stream
}

const (
	philoxM0 = 0xD2511F53
	philoxM1 = 0xCD9E8D57
	philoxW0 = 0x9E3779B9
	philoxW1 = 0xBB67AE85
)

// Philox4x32 returns the Philox4x32-10 block for counter ctr and key key.
func Philox4x32(ctr [4]uint32, key [2]uint32) [4]uint32 {
	c0, c1, c2, c3 := philox(ctr[0], ctr[1], ctr[2], ctr[3], key[0], key[1])
	return [4]uint32{c0, c1, c2, c3}
}

// philox is Philox4x32-10 with its ten rounds unrolled; round r uses the
// key (k0 + r·W0, k1 + r·W1) mod 2^32.
func philox(c0, c1, c2, c3, k0, k1 uint32) (uint32, uint32, uint32, uint32) {
	c0, c1, c2, c3 = philoxRound(c0, c1, c2, c3, k0, k1)
	c0, c1, c2, c3 = philoxRound(c0, c1, c2, c3, k0+0x9e3779b9, k1+0xbb67ae85)
	c0, c1, c2, c3 = philoxRound(c0, c1, c2, c3, k0+0x3c6ef372, k1+0x76cf5d0a)
	c0, c1, c2, c3 = philoxRound(c0, c1, c2, c3, k0+0xdaa66d2b, k1+0x32370b8f)
	c0, c1, c2, c3 = philoxRound(c0, c1, c2, c3, k0+0x78dde6e4, k1+0xed9eba14)
	c0, c1, c2, c3 = philoxRound(c0, c1, c2, c3, k0+0x1715609d, k1+0xa9066899)
	c0, c1, c2, c3 = philoxRound(c0, c1, c2, c3, k0+0xb54cda56, k1+0x646e171e)
	c0, c1, c2, c3 = philoxRound(c0, c1, c2, c3, k0+0x5384540f, k1+0x1fd5c5a3)
	c0, c1, c2, c3 = philoxRound(c0, c1, c2, c3, k0+0xf1bbcdc8, k1+0xdb3d7428)
	return philoxRound(c0, c1, c2, c3, k0+0x8ff34781, k1+0x96a522ad)
}

func philoxRound(c0, c1, c2, c3, k0, k1 uint32) (uint32, uint32, uint32, uint32) {
	p0 := uint64(philoxM0) * uint64(c0)
	p1 := uint64(philoxM1) * uint64(c2)
	return uint32(p1>>32) ^ c1 ^ k0, uint32(p1), uint32(p0>>32) ^ c3 ^ k1, uint32(p0)
}

// At returns the single value at (step, channel, y, x). It is meant for tests
// and spot checks; Fill is much faster for regions.
func (n Noise) At(step, channel, y, x int) float32 {
	var q [4]float32
	n.block(&q, uint32(step), uint32(channel), uint32(y), uint32(x>>2))
	return q[x&3]
}

// Fill writes the normals of channels [0, c) of the h×w region whose top-left
// corner is the global position (y0, x0) at the given step into dst, planar
// (c×h×w). Coordinates are global canvas coordinates and must be
// non-negative; c must be below 65536.
func (n Noise) Fill(dst []float32, step, c, y0, x0, h, w int) error {
	if c < 0 || h < 0 || w < 0 || y0 < 0 || x0 < 0 || step < 0 {
		return fmt.Errorf("noise fill: negative argument (step %d, c %d, y0 %d, x0 %d, h %d, w %d)", step, c, y0, x0, h, w)
	}
	if c >= 1<<16 || int64(y0)+int64(h) > 1<<32 || int64(x0)+int64(w) > 1<<34 || int64(step) >= 1<<32 {
		return fmt.Errorf("noise fill: coordinates out of range")
	}
	if len(dst) != c*h*w {
		return fmt.Errorf("noise fill: dst has %d values, want %d (%d×%d×%d)", len(dst), c*h*w, c, h, w)
	}
	var q [4]float32
	for ch := 0; ch < c; ch++ {
		for yy := 0; yy < h; yy++ {
			row := dst[(ch*h+yy)*w : (ch*h+yy+1)*w]
			y := uint32(y0 + yy)
			x := x0
			i := 0
			// Unaligned head.
			if r := x & 3; r != 0 && i < w {
				n.block(&q, uint32(step), uint32(ch), y, uint32(x>>2))
				for ; r < 4 && i < w; r++ {
					row[i] = q[r]
					i++
					x++
				}
			}
			// Aligned body, four values per block.
			for ; i+4 <= w; i += 4 {
				n.block((*[4]float32)(row[i:i+4]), uint32(step), uint32(ch), y, uint32(x>>2))
				x += 4
			}
			// Tail.
			if i < w {
				n.block(&q, uint32(step), uint32(ch), y, uint32(x>>2))
				for r := 0; i < w; r++ {
					row[i] = q[r]
					i++
				}
			}
		}
	}
	return nil
}

// block computes the four normals of one Philox block.
func (n Noise) block(out *[4]float32, step, ch, y, xb uint32) {
	r0, r1, r2, r3 := philox(xb, y, step, uint32(n.Stream)<<16|ch, uint32(n.Seed), uint32(n.Seed>>32))
	out[0], out[1] = boxMuller(r0, r1)
	out[2], out[3] = boxMuller(r2, r3)
}

// boxMuller maps two uniform 32-bit words to two independent standard
// normals: radius sqrt(-2 ln u1) with u1 = (a+0.5)/2^32 in (0,1), angle from
// b: the top two bits pick a quadrant, the remaining 30 bits an offset d in
// (-π/4, π/4), and (cos, sin) of the angle is (cos d, sin d) rotated by the
// quadrant. The angle is uniform on the circle, as Box–Muller requires.
func boxMuller(a, b uint32) (float32, float32) {
	u1 := (float64(a) + 0.5) * (1.0 / 4294967296.0)
	r := math.Sqrt(-2 * fastLog(u1))
	d := ((float64(b&(1<<30-1))+0.5)*(1.0/1073741824.0) - 0.5) * (math.Pi / 2)
	d2 := d * d
	// Taylor polynomials on |d| ≤ π/4: errors below 4e-9 (sin) and 4e-10 (cos).
	s := d * (1 + d2*(-1.0/6+d2*(1.0/120+d2*(-1.0/5040+d2*(1.0/362880)))))
	c := 1 + d2*(-0.5+d2*(1.0/24+d2*(-1.0/720+d2*(1.0/40320+d2*(-1.0/3628800)))))
	switch b >> 30 {
	case 1:
		c, s = -s, c
	case 2:
		c, s = -c, -s
	case 3:
		c, s = s, -c
	}
	return float32(r * c), float32(r * s)
}

// logTable holds, for the 128 subintervals of the mantissa range [1, 2),
// the reciprocal and the logarithm of each subinterval's centre.
var logTable = func() (t [128][2]float64) {
	for j := range t {
		c := 1 + (float64(j)+0.5)/128
		t[j] = [2]float64{1 / c, math.Log(c)}
	}
	return t
}()

// fastLog is the natural logarithm for positive, finite, normal x, accurate
// to about 1e-15: x = m·2^e with m in [1, 2); the top 7 mantissa bits pick a
// centre c with |m/c - 1| < 2^-8, and ln x = e·ln 2 + ln c + log1p(m/c - 1),
// the last by its series to the fifth power. No division, no branch.
func fastLog(x float64) float64 {
	b := math.Float64bits(x)
	e := int64(b>>52&0x7ff) - 1023
	m := math.Float64frombits(b&(1<<52-1) | 1023<<52)
	t := &logTable[b>>45&127]
	r := m*t[0] - 1
	p := r * (1 + r*(-0.5+r*(1.0/3+r*(-0.25+r*0.2))))
	return float64(e)*math.Ln2 + t[1] + p
}

// CanvasFiller returns a function that fills a whole c×h×w canvas with the
// normals of a step, in the form SamplerOptions.EtaNoise takes.
func (n Noise) CanvasFiller(c, h, w int) func(step int, dst []float32) error {
	return func(step int, dst []float32) error { return n.Fill(dst, step, c, 0, 0, h, w) }
}

// RowsFiller returns a function that fills rows [y0, y1) of every channel
// of a c×h×w canvas (c×(y1−y0)×w values) with the normals of a step, the
// same values CanvasFiller puts there, in the form
// SamplerOptions.EtaNoiseRows takes.
func (n Noise) RowsFiller(c, w int) func(step int, dst []float32, y0, y1 int) error {
	return func(step int, dst []float32, y0, y1 int) error {
		if y1 < y0 {
			return fmt.Errorf("noise fill: rows [%d, %d)", y0, y1)
		}
		return n.Fill(dst, step, c, y0, 0, y1-y0, w)
	}
}
