// CPU matmul against GGUF block-quantized weights, reading the blocks as stored (no float32 copy).
//
//   y (T, N) = x (T, K) @ W (N, K)^T      x, y float32 row-major; W: N rows of K/QK blocks
//
// Each format is one function, dequant_<type>(src, dst, nblocks): `nblocks` consecutive blocks ->
// nblocks * QK floats, plus one row in FORMATS below. Everything else is format-independent:
//
//   qk_matmul        decode and short batches (T <= a few rows): each thread takes a range of
//                    output rows; a row is dequantized CHUNK elements at a time into a buffer on
//                    the thread's stack (L1-resident) and dotted with every x row right away, so
//                    the weight bytes are read once per call and nothing larger than CHUNK floats
//                    is ever written. Traffic: the weight's bytes + T*K + T*N floats.
//   qk_dequant_rows  rows [r0, r1) to float32 (the prompt path dequantizes a bounded tile of rows
//                    and hands it to torch's GEMM; also the tests' reference hook);
//                    qk_dequant_rows_bf16 the same rounded to bfloat16 (--numerics bf16).
//
// Arithmetic: values as in ggml's dequantize_row_* (f16 scales to float32, one multiply per value,
// K-quants' products d*sc and dmin*m first), sums in float32 in SIMD lanes (order differs from a
// BLAS matmul by rounding only).
//
// Built by runtime/cpu/build.py: g++ -O3 -march=native -fopenmp -shared; loaded with ctypes.

#include <cstdint>
#include <cstring>
#include <vector>

#include "half.h"
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline float f16(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return half_to_float(h);
}

static inline float bf16(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    uint32_t bits = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

typedef void (*dequant_fn)(const uint8_t* __restrict src, float* __restrict dst, int64_t nblocks);

// -- one function per format ----------------------------------------------------------------------

// Q4_0 (32, 2 + 16): f16 d, 16 bytes of nibbles; x[j] = (lo(q[j]) - 8) d, x[j + 16] = (hi(q[j]) - 8) d
static void dequant_q4_0(const uint8_t* __restrict b, float* __restrict y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 18, y += 32) {
        const float d = f16(b);
        const uint8_t* q = b + 2;
        for (int j = 0; j < 16; j++) {
            y[j] = (float)((q[j] & 0xf) - 8) * d;
            y[j + 16] = (float)((q[j] >> 4) - 8) * d;
        }
    }
}

// Q4_1 (32, 2 + 2 + 16): f16 d, f16 m, nibbles; x = q d + m
static void dequant_q4_1(const uint8_t* __restrict b, float* __restrict y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 20, y += 32) {
        const float d = f16(b), m = f16(b + 2);
        const uint8_t* q = b + 4;
        for (int j = 0; j < 16; j++) {
            y[j] = (float)(q[j] & 0xf) * d + m;
            y[j + 16] = (float)(q[j] >> 4) * d + m;
        }
    }
}

// Q5_0 (32, 2 + 4 + 16): f16 d, 32 fifth bits (qh, little-endian u32), nibbles; x = (q - 16) d
static void dequant_q5_0(const uint8_t* __restrict b, float* __restrict y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 22, y += 32) {
        const float d = f16(b);
        uint32_t qh;
        std::memcpy(&qh, b + 2, 4);
        const uint8_t* q = b + 6;
        for (int j = 0; j < 16; j++) {
            const int h0 = ((qh >> j) << 4) & 0x10, h1 = (qh >> (j + 12)) & 0x10;
            y[j] = (float)(((q[j] & 0xf) | h0) - 16) * d;
            y[j + 16] = (float)(((q[j] >> 4) | h1) - 16) * d;
        }
    }
}

// Q5_1 (32, 2 + 2 + 4 + 16): f16 d, f16 m, qh, nibbles; x = q d + m
static void dequant_q5_1(const uint8_t* __restrict b, float* __restrict y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 24, y += 32) {
        const float d = f16(b), m = f16(b + 2);
        uint32_t qh;
        std::memcpy(&qh, b + 4, 4);
        const uint8_t* q = b + 8;
        for (int j = 0; j < 16; j++) {
            const int h0 = ((qh >> j) << 4) & 0x10, h1 = (qh >> (j + 12)) & 0x10;
            y[j] = (float)((q[j] & 0xf) | h0) * d + m;
            y[j + 16] = (float)((q[j] >> 4) | h1) * d + m;
        }
    }
}

// Q8_0 (32, 2 + 32): f16 d, 32 int8; x = q d
static void dequant_q8_0(const uint8_t* __restrict b, float* __restrict y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 34, y += 32) {
        const float d = f16(b);
        const int8_t* q = (const int8_t*)(b + 2);
        for (int j = 0; j < 32; j++) y[j] = (float)q[j] * d;
    }
}

// K-quants' 6-bit scale and min of sub-block j from the 12 scale bytes
static inline void scale_min_k4(int j, const uint8_t* s, int* sc, int* m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// Q4_K (256, 2 + 2 + 12 + 128): 8 sub-blocks of 32, x = (d sc) q - (dmin m)
static void dequant_q4_k(const uint8_t* __restrict b, float* __restrict y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 144) {
        const float d = f16(b), dmin = f16(b + 2);
        const uint8_t* s = b + 4;
        const uint8_t* q = b + 16;
        for (int j = 0; j < 8; j += 2, q += 32, y += 64) {
            int sc, m;
            scale_min_k4(j, s, &sc, &m);
            const float d1 = d * sc, m1 = dmin * m;
            scale_min_k4(j + 1, s, &sc, &m);
            const float d2 = d * sc, m2 = dmin * m;
            for (int l = 0; l < 32; l++) y[l] = d1 * (float)(q[l] & 0xf) - m1;
            for (int l = 0; l < 32; l++) y[l + 32] = d2 * (float)(q[l] >> 4) - m2;
        }
    }
}

// Q5_K (256, 2 + 2 + 12 + 32 + 128): as Q4_K with a fifth bit per weight in qh
static void dequant_q5_k(const uint8_t* __restrict b, float* __restrict y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 176) {
        const float d = f16(b), dmin = f16(b + 2);
        const uint8_t* s = b + 4;
        const uint8_t* qh = b + 16;
        const uint8_t* q = b + 48;
        for (int j = 0; j < 8; j += 2, q += 32, y += 64) {
            int sc, m;
            scale_min_k4(j, s, &sc, &m);
            const float d1 = d * sc, m1 = dmin * m;
            scale_min_k4(j + 1, s, &sc, &m);
            const float d2 = d * sc, m2 = dmin * m;
            for (int l = 0; l < 32; l++) y[l] = d1 * (float)((q[l] & 0xf) | (((qh[l] >> j) & 1) << 4)) - m1;
            for (int l = 0; l < 32; l++) y[l + 32] = d2 * (float)((q[l] >> 4) | (((qh[l] >> (j + 1)) & 1) << 4)) - m2;
        }
    }
}

// Q6_K (256, 128 + 64 + 16 + 2): ql low nibbles, qh 2 high bits, 16 int8 scales, f16 d; x = (d sc) (q - 32)
static void dequant_q6_k(const uint8_t* __restrict b, float* __restrict y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 210) {
        const float d = f16(b + 208);
        const uint8_t* ql = b;
        const uint8_t* qh = b + 128;
        const int8_t* sc = (const int8_t*)(b + 192);
        for (int n = 0; n < 2; n++, y += 128, ql += 64, qh += 32, sc += 8) {
            for (int is = 0; is < 2; is++) {  // 16 values per scale: constant products, loops that vectorize
                const float d0 = d * sc[is], d1 = d * sc[is + 2], d2 = d * sc[is + 4], d3 = d * sc[is + 6];
                for (int l = 16 * is; l < 16 * is + 16; l++) {
                    y[l] = d0 * (float)(((ql[l] & 0xf) | (((qh[l] >> 0) & 3) << 4)) - 32);
                    y[l + 32] = d1 * (float)(((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) - 32);
                    y[l + 64] = d2 * (float)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
                    y[l + 96] = d3 * (float)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
                }
            }
        }
    }
}

// Q2_K (256, 16 + 64 + 2 + 2): 16 x (4-bit scale | 4-bit min << 4), 2-bit qs, f16 d, f16 dmin.
// Element e = 128 h + 32 p + l: q = (qs[32 h + l] >> 2 p) & 3, sub-block e / 16;
// x = (d sc) q - (dmin m), each product rounded to float32 first (as qkvgguf/quants/q2k_q3k.py)
static void dequant_q2_k(const uint8_t* __restrict b, float* __restrict y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 84, y += 256) {
        const float d = f16(b + 80), dmin = f16(b + 82);
        const uint8_t* sc = b;
        const uint8_t* qs = b + 16;
        for (int h = 0; h < 2; h++)
            for (int p = 0; p < 4; p++)
                for (int half = 0; half < 2; half++) {  // one sub-block of 16: constant dl, ml (a loop that vectorizes)
                    const int s = 8 * h + 2 * p + half;
                    const float dl = d * (float)(sc[s] & 15), ml = dmin * (float)(sc[s] >> 4);
                    float* o = y + 128 * h + 32 * p;
                    for (int l = 16 * half; l < 16 * half + 16; l++) o[l] = dl * (float)((qs[32 * h + l] >> (2 * p)) & 3) - ml;
                }
    }
}

// Q3_K (256, 32 + 64 + 12 + 2): hmask (third bit), 2-bit qs, 16 6-bit scales in 12 bytes, f16 d.
// q = low - 4 (1 - bit), bit = (hmask[e % 32] >> (e / 32)) & 1; x = (d (scale - 32)) q
static void dequant_q3_k(const uint8_t* __restrict b, float* __restrict y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 110, y += 256) {
        const uint8_t* hm = b;
        const uint8_t* qs = b + 32;
        const uint8_t* sc = b + 96;
        const float d = f16(b + 108);
        float dl[16];
        for (int s = 0; s < 16; s++) {
            const int low = s < 8 ? (sc[s] & 15) : (sc[s - 8] >> 4), high = (sc[8 + s % 4] >> (2 * (s / 4))) & 3;
            dl[s] = d * (float)((int)(int8_t)(uint8_t)(low | (high << 4)) - 32);
        }
        for (int h = 0; h < 2; h++)
            for (int p = 0; p < 4; p++)
                for (int half = 0; half < 2; half++) {  // e = 128 h + 32 p + l: e % 32 = l, e / 32 = 4 h + p
                    const float ds = dl[8 * h + 2 * p + half];
                    float* o = y + 128 * h + 32 * p;
                    for (int l = 16 * half; l < 16 * half + 16; l++) {
                        const int q = ((qs[32 * h + l] >> (2 * p)) & 3) - 4 * (1 - ((hm[l] >> (4 * h + p)) & 1));
                        o[l] = ds * (float)q;
                    }
                }
    }
}

// IQ4_NL (32, 2 + 16) and IQ4_XS (256, 2 + 2 + 4 + 128): 4-bit indices into 16 non-linear levels
static const float IQ4_LEVELS[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

static void dequant_iq4_nl(const uint8_t* __restrict b, float* __restrict y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 18, y += 32) {
        const float d = f16(b);
        const uint8_t* q = b + 2;
        for (int j = 0; j < 16; j++) {
            y[j] = IQ4_LEVELS[q[j] & 15] * d;
            y[j + 16] = IQ4_LEVELS[q[j] >> 4] * d;
        }
    }
}

// IQ4_XS: f16 d, 16-bit high scale bits (2 per sub-block), 4 bytes of low nibbles, 8 x 16 bytes of
// indices; sub-block s of 32: x = (d (ls - 32)) level, ls = low nibble | high bits << 4
static inline int iq4_xs_ls(const uint8_t* b, int s) {  // sub-block s's signed scale, ls - 32
    const int sh = b[2] | (b[3] << 8);
    return (((b[4 + s / 2] >> (4 * (s % 2))) & 15) | (((sh >> (2 * s)) & 3) << 4)) - 32;
}

static void dequant_iq4_xs(const uint8_t* __restrict b, float* __restrict y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 136) {
        const float d = f16(b);
        for (int s = 0; s < 8; s++, y += 32) {
            const int ls = iq4_xs_ls(b, s);
            const float dl = d * (float)ls;
            const uint8_t* q = b + 8 + 16 * s;
            for (int j = 0; j < 16; j++) {
                y[j] = IQ4_LEVELS[q[j] & 15] * dl;
                y[j + 16] = IQ4_LEVELS[q[j] >> 4] * dl;
            }
        }
    }
}

// Float weights, "blocks" of one value
static void dequant_f32(const uint8_t* __restrict b, float* __restrict y, int64_t n) { std::memcpy(y, b, 4 * n); }
static void dequant_f16(const uint8_t* __restrict b, float* __restrict y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = f16(b + 2 * i);
}
static void dequant_bf16(const uint8_t* __restrict b, float* __restrict y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = bf16(b + 2 * i);
}

// -- fused dot products: one weight row against one x row, dequantizing in registers ------------------
//
// dot_<type>(row, x, xsum, nblocks): sum_k W[k] x[k] over `nblocks` blocks, where xsum holds the sums
// of x over each run of 32 values (for the formats with a min: sum (q d + m) x = d sum q x + m sum x).
// Written once over a vector of W float lanes: AVX-512 (W = 16) or AVX2 + FMA (W = 8). A format
// without one uses its dequant function into an L1 buffer and a plain dot (qk_matmul below).

typedef float (*dot_fn)(const uint8_t* __restrict w, const float* __restrict x, const float* __restrict xsum,
                        int64_t nb);

#if defined(__AVX512F__)
#define QK_SIMD 16
typedef __m512 vf;
typedef __m512i vi;
static inline vi ld_u8(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }
static inline vi ld_i8(const uint8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)); }
static inline vi vand(vi a, int m) { return _mm512_and_si512(a, _mm512_set1_epi32(m)); }
static inline vi vsrl(vi a, int s) { return _mm512_srli_epi32(a, s); }
static inline vi vsll(vi a, int s) { return _mm512_slli_epi32(a, s); }
static inline vi vor(vi a, vi b) { return _mm512_or_si512(a, b); }
static inline vi vsubi(vi a, int s) { return _mm512_sub_epi32(a, _mm512_set1_epi32(s)); }
static inline vf cvt(vi a) { return _mm512_cvtepi32_ps(a); }
static inline vf ldf(const float* p) { return _mm512_loadu_ps(p); }
static inline void stf(float* p, vf a) { _mm512_storeu_ps(p, a); }
static inline vf set1(float v) { return _mm512_set1_ps(v); }
static inline vf zero() { return _mm512_setzero_ps(); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline float hsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline vi set1i(int v) { return _mm512_set1_epi32(v); }
static inline vi vsrlv(vi a, vi s) { return _mm512_srlv_epi32(a, s); }
static inline vi ldi(const int32_t* p) { return _mm512_loadu_si512((const void*)p); }
// t[idx & 15] per lane, t: 16 floats
static inline vf lut16(const float* t, vi idx) { return _mm512_permutexvar_ps(idx, _mm512_loadu_ps(t)); }
#elif defined(__AVX2__) && defined(__FMA__)
#define QK_SIMD 8
typedef __m256 vf;
typedef __m256i vi;
static inline vi ld_u8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
static inline vi ld_i8(const uint8_t* p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
static inline vi vand(vi a, int m) { return _mm256_and_si256(a, _mm256_set1_epi32(m)); }
static inline vi vsrl(vi a, int s) { return _mm256_srli_epi32(a, s); }
static inline vi vsll(vi a, int s) { return _mm256_slli_epi32(a, s); }
static inline vi vor(vi a, vi b) { return _mm256_or_si256(a, b); }
static inline vi vsubi(vi a, int s) { return _mm256_sub_epi32(a, _mm256_set1_epi32(s)); }
static inline vf cvt(vi a) { return _mm256_cvtepi32_ps(a); }
static inline vf ldf(const float* p) { return _mm256_loadu_ps(p); }
static inline void stf(float* p, vf a) { _mm256_storeu_ps(p, a); }
static inline vf set1(float v) { return _mm256_set1_ps(v); }
static inline vf zero() { return _mm256_setzero_ps(); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vi set1i(int v) { return _mm256_set1_epi32(v); }
static inline vi vsrlv(vi a, vi s) { return _mm256_srlv_epi32(a, s); }
static inline vi ldi(const int32_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
static inline vf lut16(const float* t, vi idx) {  // t[idx & 15] per lane: two 8-entry permutes, picked by bit 3
    const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(t), idx);
    const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(t + 8), idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
static inline float hsum(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#ifdef QK_SIMD
static const int VW = QK_SIMD;

// sum q x over a 32-block of nibbles (q: 16 bytes; low nibbles are values 0..15, high 16..31), q - bias
static inline vf nibbles_dot(const uint8_t* q, const float* x, int bias) {
    vf p = zero();
    for (int g = 0; g < 16; g += VW) {
        const vi v = ld_u8(q + g);
        p = vfma(cvt(vsubi(vand(v, 0xf), bias)), ldf(x + g), p);
        p = vfma(cvt(vsubi(vsrl(v, 4), bias)), ldf(x + 16 + g), p);
    }
    return p;
}

static const int32_t LANE[32] = {0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15,
                                  16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31};

// sum (q - bias) x over a 32-block of 5-bit values: nibble j | bit j of qh << 4 (values 0..15), nibble
// j's high half | bit j + 16 of qh << 4 (values 16..31), as ggml's dequantize_row_q5_0 reads them
static inline vf q5_dot(const uint8_t* q, uint32_t qh, const float* x, int bias) {
    vf p = zero();
    const vi h = set1i((int)qh);
    for (int g = 0; g < 16; g += VW) {
        const vi v = ld_u8(q + g);
        const vi lo = vor(vand(v, 0xf), vsll(vand(vsrlv(h, ldi(LANE + g)), 1), 4));
        const vi hi = vor(vsrl(v, 4), vsll(vand(vsrlv(h, ldi(LANE + 16 + g)), 1), 4));
        p = vfma(cvt(vsubi(lo, bias)), ldf(x + g), p);
        p = vfma(cvt(vsubi(hi, bias)), ldf(x + 16 + g), p);
    }
    return p;
}

static float dot_q5_0(const uint8_t* __restrict b, const float* __restrict x, const float*, int64_t nb) {
    vf acc = zero();
    for (int64_t i = 0; i < nb; i++, b += 22, x += 32) {
        uint32_t qh;
        std::memcpy(&qh, b + 2, 4);
        acc = vfma(set1(f16(b)), q5_dot(b + 6, qh, x, 16), acc);
    }
    return hsum(acc);
}

static float dot_q5_1(const uint8_t* __restrict b, const float* __restrict x, const float* __restrict xs, int64_t nb) {
    vf acc = zero();
    float mins = 0.0f;
    for (int64_t i = 0; i < nb; i++, b += 24, x += 32) {
        uint32_t qh;
        std::memcpy(&qh, b + 4, 4);
        acc = vfma(set1(f16(b)), q5_dot(b + 8, qh, x, 0), acc);
        mins += f16(b + 2) * xs[i];
    }
    return hsum(acc) + mins;
}

static float dot_q4_0(const uint8_t* __restrict b, const float* __restrict x, const float*, int64_t nb) {
    vf acc = zero();
    for (int64_t i = 0; i < nb; i++, b += 18, x += 32) acc = vfma(set1(f16(b)), nibbles_dot(b + 2, x, 8), acc);
    return hsum(acc);
}

static float dot_q4_1(const uint8_t* __restrict b, const float* __restrict x, const float* __restrict xs, int64_t nb) {
    vf acc = zero();
    float mins = 0.0f;
    for (int64_t i = 0; i < nb; i++, b += 20, x += 32) {
        acc = vfma(set1(f16(b)), nibbles_dot(b + 4, x, 0), acc);
        mins += f16(b + 2) * xs[i];
    }
    return hsum(acc) + mins;
}

static float dot_q8_0(const uint8_t* __restrict b, const float* __restrict x, const float*, int64_t nb) {
    vf acc = zero();
    for (int64_t i = 0; i < nb; i++, b += 34, x += 32) {
        vf p = zero();
        for (int g = 0; g < 32; g += VW) p = vfma(cvt(ld_i8(b + 2 + g)), ldf(x + g), p);
        acc = vfma(set1(f16(b)), p, acc);
    }
    return hsum(acc);
}

// The 8 sub-block scales d sc_j of a Q4_K/Q5_K block into dsc, and its min terms dmin m_j xs_j added
// lane-wise into macc (summed once per row by hsum8). The 6-bit scales and mins are unpacked four at
// a time from 32-bit words (the layout scale_min_k4 reads one at a time) and multiplied in AVX2
// vectors: this per-block work was scalar code between the vector loops, 53% of a hot Q4_K dot's
// samples (perf), and summing the min terms in order within each block was a chain of 8 dependent
// adds per block.
static inline void k4_scales(const uint8_t* b, const float* xs, float* dsc, __m256& macc) {
    const float d = f16(b), dmin = f16(b + 2);
    uint32_t u[3];
    std::memcpy(u, b + 4, 12);
    const uint32_t sc_lo = u[0] & 0x3f3f3f3fu, m_lo = u[1] & 0x3f3f3f3fu;  // j < 4: s[j] & 63, s[j + 4] & 63
    const uint32_t sc_hi = (u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4);  // j >= 4
    const uint32_t m_hi = ((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4);
    const __m256 scf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, (int)sc_hi, (int)sc_lo)));
    const __m256 mf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, (int)m_hi, (int)m_lo)));
    _mm256_storeu_ps(dsc, _mm256_mul_ps(_mm256_set1_ps(d), scf));
    macc = _mm256_add_ps(macc, _mm256_mul_ps(_mm256_set1_ps(dmin), _mm256_mul_ps(mf, _mm256_loadu_ps(xs))));
}

static inline float hsum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// two accumulators (low and high nibble sub-blocks) so consecutive FMAs into them do not wait on each other
static float dot_q4_k(const uint8_t* __restrict b, const float* __restrict x, const float* __restrict xs, int64_t nb) {
    vf acc0 = zero(), acc1 = zero();
    __m256 mins = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++, b += 144, xs += 8) {
        alignas(32) float dsc[8];
        k4_scales(b, xs, dsc, mins);
        const uint8_t* q = b + 16;
        for (int j = 0; j < 8; j += 2, q += 32, x += 64) {
            vf lo = zero(), hi = zero();
            for (int g = 0; g < 32; g += VW) {
                const vi v = ld_u8(q + g);
                lo = vfma(cvt(vand(v, 0xf)), ldf(x + g), lo);
                hi = vfma(cvt(vsrl(v, 4)), ldf(x + 32 + g), hi);
            }
            acc0 = vfma(set1(dsc[j]), lo, acc0);
            acc1 = vfma(set1(dsc[j + 1]), hi, acc1);
        }
    }
    return hsum(vadd(acc0, acc1)) - hsum8(mins);
}

static float dot_q6_k(const uint8_t* __restrict b, const float* __restrict x, const float*, int64_t nb) {
    vf acc = zero();
    for (int64_t i = 0; i < nb; i++, b += 210) {
        const float d = f16(b + 208);
        const uint8_t* ql = b;
        const uint8_t* qh = b + 128;
        // the 16 products d * scale, two AVX2 vectors (the same products the scalar form rounds)
        alignas(32) float dsc[16];
        const __m128i s8 = _mm_loadu_si128((const __m128i*)(b + 192));
        _mm256_store_ps(dsc, _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s8))));
        _mm256_store_ps(dsc + 8, _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(s8, 8)))));
        const float* sc = dsc;
#if defined(__AVX512BW__)
        // the 6-bit values assembled 64 bytes at a time (the loop below does it 16 int32 lanes at a time,
        // ~4x the integer work), then widened 16 at a time; the same float operations in the same order
        const __m512i m4 = _mm512_set1_epi8(0x0F), m2 = _mm512_set1_epi8(0x03), b32 = _mm512_set1_epi8(32);
        for (int n = 0; n < 2; n++, x += 128, ql += 64, qh += 32, sc += 8) {
            const __m512i L = _mm512_loadu_si512((const void*)ql);  // ql[0..31] | ql[32..63]
            const __m256i H = _mm256_loadu_si256((const __m256i*)qh);
            const __m512i Ha = _mm512_inserti64x4(_mm512_castsi256_si512(H), _mm256_srli_epi16(H, 2), 1);
            const __m512i Hb = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_srli_epi16(H, 4)),
                                                  _mm256_srli_epi16(H, 6), 1);
            // bytes 0..31: q1 (values 0..31), 32..63: q2 (32..63); q34 the same for q3, q4 (64..127)
            const __m512i q12 = _mm512_sub_epi8(_mm512_or_si512(_mm512_and_si512(L, m4),
                                                                _mm512_slli_epi16(_mm512_and_si512(Ha, m2), 4)), b32);
            const __m512i q34 = _mm512_sub_epi8(_mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(L, 4), m4),
                                                                _mm512_slli_epi16(_mm512_and_si512(Hb, m2), 4)), b32);
#define Q6_LANE(v, k) cvt(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, k)))
            // l = 0 (the first 16 values of each quarter), then l = 16, as the loop below orders them
            acc = vfma(set1(sc[0]), vmul(Q6_LANE(q12, 0), ldf(x)), acc);
            acc = vfma(set1(sc[2]), vmul(Q6_LANE(q12, 2), ldf(x + 32)), acc);
            acc = vfma(set1(sc[4]), vmul(Q6_LANE(q34, 0), ldf(x + 64)), acc);
            acc = vfma(set1(sc[6]), vmul(Q6_LANE(q34, 2), ldf(x + 96)), acc);
            acc = vfma(set1(sc[1]), vmul(Q6_LANE(q12, 1), ldf(x + 16)), acc);
            acc = vfma(set1(sc[3]), vmul(Q6_LANE(q12, 3), ldf(x + 48)), acc);
            acc = vfma(set1(sc[5]), vmul(Q6_LANE(q34, 1), ldf(x + 80)), acc);
            acc = vfma(set1(sc[7]), vmul(Q6_LANE(q34, 3), ldf(x + 112)), acc);
#undef Q6_LANE
        }
#else
        for (int n = 0; n < 2; n++, x += 128, ql += 64, qh += 32, sc += 8) {
            for (int l = 0; l < 32; l += VW) {
                const int is = l / 16;
                const vi a = ld_u8(ql + l), c = ld_u8(ql + 32 + l), h = ld_u8(qh + l);
                const vi q1 = vsubi(vor(vand(a, 0xf), vsll(vand(h, 3), 4)), 32);
                const vi q2 = vsubi(vor(vand(c, 0xf), vsll(vand(vsrl(h, 2), 3), 4)), 32);
                const vi q3 = vsubi(vor(vsrl(a, 4), vsll(vand(vsrl(h, 4), 3), 4)), 32);
                const vi q4 = vsubi(vor(vsrl(c, 4), vsll(vsrl(h, 6), 4)), 32);
                acc = vfma(set1(sc[is]), vmul(cvt(q1), ldf(x + l)), acc);
                acc = vfma(set1(sc[is + 2]), vmul(cvt(q2), ldf(x + 32 + l)), acc);
                acc = vfma(set1(sc[is + 4]), vmul(cvt(q3), ldf(x + 64 + l)), acc);
                acc = vfma(set1(sc[is + 6]), vmul(cvt(q4), ldf(x + 96 + l)), acc);
            }
        }
#endif
    }
    return hsum(acc);
}
// Q5_K: Q4_K with a fifth bit per weight, bit j of qh[l] for sub-block j
static float dot_q5_k(const uint8_t* __restrict b, const float* __restrict x, const float* __restrict xs, int64_t nb) {
    vf acc0 = zero(), acc1 = zero();
    __m256 mins = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++, b += 176, xs += 8) {
        alignas(32) float dsc[8];
        k4_scales(b, xs, dsc, mins);
        const uint8_t* qh = b + 16;
        const uint8_t* q = b + 48;
        for (int j = 0; j < 8; j += 2, q += 32, x += 64) {
            vf lo = zero(), hi = zero();
            for (int g = 0; g < 32; g += VW) {
                const vi v = ld_u8(q + g), h = ld_u8(qh + g);
                lo = vfma(cvt(vor(vand(v, 0xf), vsll(vand(vsrl(h, j), 1), 4))), ldf(x + g), lo);
                hi = vfma(cvt(vor(vsrl(v, 4), vsll(vand(vsrl(h, j + 1), 1), 4))), ldf(x + 32 + g), hi);
            }
            acc0 = vfma(set1(dsc[j]), lo, acc0);
            acc1 = vfma(set1(dsc[j + 1]), hi, acc1);
        }
    }
    return hsum(vadd(acc0, acc1)) - hsum8(mins);
}

// Q2_K: 16 sub-blocks of 16, element 128 h + 32 p + l = (qs[32 h + l] >> 2 p) & 3, weights dl q - ml
// formed per lane as the dequantizer forms them (then one FMA with x)
static float dot_q2_k(const uint8_t* __restrict b, const float* __restrict x, const float*, int64_t nb) {
    vf acc = zero();
    for (int64_t i = 0; i < nb; i++, b += 84) {
        const float d = f16(b + 80), dmin = f16(b + 82);
        const uint8_t* qs = b + 16;
        // the 16 sub-blocks' d * scale and dmin * min, as AVX2 vectors (the same products, rounded once)
        alignas(32) float dls[16], mls[16];
        const __m128i s8 = _mm_loadu_si128((const __m128i*)b);
        const __m128i lo4 = _mm_and_si128(s8, _mm_set1_epi8(15)), hi4 = _mm_and_si128(_mm_srli_epi16(s8, 4), _mm_set1_epi8(15));
        for (int k = 0; k < 2; k++) {
            _mm256_store_ps(dls + 8 * k, _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo4, 8 * k)))));
            _mm256_store_ps(mls + 8 * k, _mm256_mul_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi4, 8 * k)))));
        }
        for (int h = 0; h < 2; h++)
            for (int p = 0; p < 4; p++)
                for (int l16 = 0; l16 < 32; l16 += 16) {
                    const int e = 128 * h + 32 * p + l16, sb = e / 16;
                    const vf dl = set1(dls[sb]), ml = set1(mls[sb]);
                    for (int g = 0; g < 16; g += VW) {
                        const vi q = vand(vsrl(ld_u8(qs + 32 * h + l16 + g), 2 * p), 3);
                        acc = vfma(vsub(vmul(dl, cvt(q)), ml), ldf(x + e + g), acc);
                    }
                }
        x += 256;
    }
    return hsum(acc);
}

// Q3_K: q = (low 2 bits | the hmask bit << 2) - 4, 16 sub-blocks of 16 with 6-bit signed scales
static float dot_q3_k(const uint8_t* __restrict b, const float* __restrict x, const float*, int64_t nb) {
    vf acc = zero();
    for (int64_t i = 0; i < nb; i++, b += 110, x += 256) {
        const uint8_t* hm = b;
        const uint8_t* qs = b + 32;
        const float d = f16(b + 108);
        // the 16 6-bit scales, four per 32-bit word: low 4 bits from bytes 0..7 (sub-block sb < 8: low
        // nibble of byte sb, else high nibble of byte sb - 8), high 2 bits from bytes 8..11 (bits
        // 2 (sb / 4) of byte 8 + sb % 4); then d * (scale - 32) in two AVX2 vectors
        uint32_t a[4];
        std::memcpy(a, b + 96, 12);
        const uint32_t t = a[2];
        a[2] = ((a[0] >> 4) & 0x0f0f0f0fu) | (((t >> 4) & 0x03030303u) << 4);
        a[3] = ((a[1] >> 4) & 0x0f0f0f0fu) | (((t >> 6) & 0x03030303u) << 4);
        a[0] = (a[0] & 0x0f0f0f0fu) | ((t & 0x03030303u) << 4);
        a[1] = (a[1] & 0x0f0f0f0fu) | (((t >> 2) & 0x03030303u) << 4);
        alignas(32) float ds[16];
        const __m128i s6 = _mm_loadu_si128((const __m128i*)a);
        for (int k = 0; k < 2; k++) {
            const __m256i v = _mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(s6, 8 * k)), _mm256_set1_epi32(32));
            _mm256_store_ps(ds + 8 * k, _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(v)));
        }
        for (int h = 0; h < 2; h++)
            for (int p = 0; p < 4; p++)
                for (int l16 = 0; l16 < 32; l16 += 16) {
                    const int e = 128 * h + 32 * p + l16, sb = e / 16;
                    vf part = zero();
                    for (int g = 0; g < 16; g += VW) {
                        const vi q = vand(vsrl(ld_u8(qs + 32 * h + l16 + g), 2 * p), 3);
                        const vi bit = vand(vsrl(ld_u8(hm + l16 + g), 4 * h + p), 1);
                        part = vfma(cvt(vsubi(vor(q, vsll(bit, 2)), 4)), ldf(x + e + g), part);
                    }
                    acc = vfma(set1(ds[sb]), part, acc);
                }
    }
    return hsum(acc);
}

// IQ4_NL / IQ4_XS: nibbles index the 16 non-linear levels (a permute per lane)
static inline vf iq4_dot(const uint8_t* q, const float* x) {
    vf p = zero();
    for (int g = 0; g < 16; g += VW) {
        const vi v = ld_u8(q + g);
        p = vfma(lut16(IQ4_LEVELS, vand(v, 0xf)), ldf(x + g), p);
        p = vfma(lut16(IQ4_LEVELS, vsrl(v, 4)), ldf(x + 16 + g), p);
    }
    return p;
}

static float dot_iq4_nl(const uint8_t* __restrict b, const float* __restrict x, const float*, int64_t nb) {
    vf acc = zero();
    for (int64_t i = 0; i < nb; i++, b += 18, x += 32) acc = vfma(set1(f16(b)), iq4_dot(b + 2, x), acc);
    return hsum(acc);
}

static float dot_iq4_xs(const uint8_t* __restrict b, const float* __restrict x, const float*, int64_t nb) {
    vf acc = zero();
    for (int64_t i = 0; i < nb; i++, b += 136) {
        const float d = f16(b);
        for (int s = 0; s < 8; s++, x += 32) {
            const int ls = iq4_xs_ls(b, s);
            acc = vfma(set1(d * (float)ls), iq4_dot(b + 8 + 16 * s, x), acc);
        }
    }
    return hsum(acc);
}

// IQ4 dequantization in vectors (the prompt path's tiles): the scalar functions' table lookup per value
// is a permute per lane here, and each value the same product level * scale (bit-identical)
static inline void iq4_dequant32(const uint8_t* q, float dl, float* y) {
    for (int g = 0; g < 16; g += VW) {
        const vi v = ld_u8(q + g);
        stf(y + g, vmul(lut16(IQ4_LEVELS, vand(v, 0xf)), set1(dl)));
        stf(y + 16 + g, vmul(lut16(IQ4_LEVELS, vsrl(v, 4)), set1(dl)));
    }
}

static void dequant_iq4_nl_v(const uint8_t* __restrict b, float* __restrict y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 18, y += 32) iq4_dequant32(b + 2, f16(b), y);
}

static void dequant_iq4_xs_v(const uint8_t* __restrict b, float* __restrict y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 136) {
        const float d = f16(b);
        for (int s = 0; s < 8; s++, y += 32) {
            const int ls = iq4_xs_ls(b, s);
            iq4_dequant32(b + 8 + 16 * s, d * (float)ls, y);
        }
    }
}
#define DOT(f) f
#define VEC(f) f##_v
#else
#define DOT(f) nullptr
#define VEC(f) f
#endif

// -- the table: ggml type id -> layout and function (ids as in ggml.h) -------------------------------

struct Format {
    int type;
    int block;      // elements per block
    int bytes;      // bytes per block
    dequant_fn fn;
    dot_fn dot;     // fused dot (nullptr: dequantize into a buffer, then dot)
};

static const Format FORMATS[] = {
    {0, 1, 4, dequant_f32, nullptr},           // F32
    {1, 1, 2, dequant_f16, nullptr},           // F16
    {2, 32, 2 + 16, dequant_q4_0, DOT(dot_q4_0)},    // Q4_0
    {3, 32, 2 + 2 + 16, dequant_q4_1, DOT(dot_q4_1)},  // Q4_1
    {6, 32, 2 + 4 + 16, dequant_q5_0, DOT(dot_q5_0)},  // Q5_0
    {7, 32, 2 + 2 + 4 + 16, dequant_q5_1, DOT(dot_q5_1)},  // Q5_1
    {8, 32, 2 + 32, dequant_q8_0, DOT(dot_q8_0)},    // Q8_0
    {10, 256, 16 + 64 + 2 + 2, dequant_q2_k, DOT(dot_q2_k)},  // Q2_K
    {11, 256, 32 + 64 + 12 + 2, dequant_q3_k, DOT(dot_q3_k)},  // Q3_K
    {12, 256, 2 + 2 + 12 + 128, dequant_q4_k, DOT(dot_q4_k)},  // Q4_K
    {13, 256, 2 + 2 + 12 + 32 + 128, dequant_q5_k, DOT(dot_q5_k)},  // Q5_K
    {14, 256, 128 + 64 + 16 + 2, dequant_q6_k, DOT(dot_q6_k)},  // Q6_K
    {20, 32, 2 + 16, VEC(dequant_iq4_nl), DOT(dot_iq4_nl)},  // IQ4_NL
    {23, 256, 2 + 2 + 4 + 128, VEC(dequant_iq4_xs), DOT(dot_iq4_xs)},  // IQ4_XS
    {30, 1, 2, dequant_bf16, nullptr},         // BF16
};

static const Format* find(int type) {
    for (const Format& f : FORMATS)
        if (f.type == type) return &f;
    return nullptr;
}

// -- format-independent loops -------------------------------------------------------------------------

#ifndef PREFETCH_ROWS
#define PREFETCH_ROWS 4  // rows of W fetched ahead of the one being dotted
#endif
static const int CHUNK = 1024;  // floats dequantized at a time per thread (4 KiB: stays in L1)

static inline float dot(const float* __restrict a, const float* __restrict b, int n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

extern "C" {

// Elements and bytes per block of `type`, 0 if this library has no function for it.
int qk_block_elems(int type) {
    const Format* f = find(type);
    return f ? f->block : 0;
}
int qk_block_bytes(int type) {
    const Format* f = find(type);
    return f ? f->bytes : 0;
}

// y (T, N) = x (T, K) @ W^T; W: N rows of `row_stride` bytes. Returns 0, or -1 for an unknown type
// or a K that is not a whole number of blocks. T <= 16 (the caller's decode path).
int qk_matmul(int type, const uint8_t* w, int64_t row_stride, int64_t N, int64_t K, const float* x, int64_t T,
              float* y, int n_threads) {
    const Format* f = find(type);
    if (!f || K % f->block != 0 || T < 1 || T > 16) return -1;
    const int64_t nb = K / f->block;
    if (f->dot && K % 32 == 0) {
        std::vector<float> xsum(T * (K / 32));  // sums of x over runs of 32 (the min terms)
        for (int64_t t = 0; t < T; t++)
            for (int64_t j = 0; j < K / 32; j++) {
                float s = 0.0f;
                for (int l = 0; l < 32; l++) s += x[t * K + 32 * j + l];
                xsum[t * (K / 32) + j] = s;
            }
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1)
        for (int64_t n = 0; n < N; n++) {
            if (n + PREFETCH_ROWS < N) {  // hardware prefetchers stop at 4 KiB pages; rows ahead, by hand
                const char* ahead = (const char*)(w + (n + PREFETCH_ROWS) * row_stride);
                for (int64_t o = 0; o < row_stride; o += 64) __builtin_prefetch(ahead + o, 0, 3);
            }
            for (int64_t t = 0; t < T; t++)
                y[t * N + n] = f->dot(w + n * row_stride, x + t * K, xsum.data() + t * (K / 32), nb);
        }
        return 0;
    }
    const int64_t chunk = (CHUNK / f->block > 0 ? CHUNK / f->block : 1) * f->block;  // whole blocks
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1)
    for (int64_t n = 0; n < N; n++) {
        alignas(64) float buf[CHUNK > 256 ? CHUNK : 256];
        float acc[16] = {0};
        const uint8_t* row = w + n * row_stride;
        for (int64_t k0 = 0; k0 < K; k0 += chunk) {
            const int64_t len = K - k0 < chunk ? K - k0 : chunk;
            f->fn(row + k0 / f->block * f->bytes, buf, len / f->block);
            for (int64_t t = 0; t < T; t++) acc[t] += dot(buf, x + t * K + k0, (int)len);
        }
        for (int64_t t = 0; t < T; t++) y[t * N + n] = acc[t];
    }
    return 0;
}

// out (r1 - r0, K) float32 = rows [r0, r1) of W. Returns 0, or -1 as qk_matmul.
int qk_dequant_rows(int type, const uint8_t* w, int64_t row_stride, int64_t r0, int64_t r1, int64_t K, float* out,
                    int n_threads) {
    const Format* f = find(type);
    if (!f || K % f->block != 0) return -1;
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1)
    for (int64_t r = r0; r < r1; r++) f->fn(w + r * row_stride, out + (r - r0) * K, K / f->block);
    return 0;
}

// out (r1 - r0, K) bfloat16 (as uint16 bits) = rows [r0, r1) of W, each value dequantized to float32 as
// above and rounded to the nearest bfloat16, ties to even (the prompt path's --numerics bf16 tiles).
// Returns 0, or -1 as qk_matmul.
int qk_dequant_rows_bf16(int type, const uint8_t* w, int64_t row_stride, int64_t r0, int64_t r1, int64_t K,
                         uint16_t* out, int n_threads) {
    const Format* f = find(type);
    if (!f || K % f->block != 0) return -1;
    const int64_t chunk = (CHUNK / f->block > 0 ? CHUNK / f->block : 1) * f->block;  // whole blocks
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1)
    for (int64_t r = r0; r < r1; r++) {
        alignas(64) float buf[CHUNK > 256 ? CHUNK : 256];
        const uint8_t* row = w + r * row_stride;
        uint16_t* o = out + (r - r0) * K;
        for (int64_t k0 = 0; k0 < K; k0 += chunk) {
            const int64_t len = K - k0 < chunk ? K - k0 : chunk;
            f->fn(row + k0 / f->block * f->bytes, buf, len / f->block);
            for (int64_t j = 0; j < len; j++) {  // round to nearest even on the bits (vectorizes)
                uint32_t u;
                std::memcpy(&u, buf + j, 4);
                o[k0 + j] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
            }
        }
    }
    return 0;
}

}  // extern "C"
