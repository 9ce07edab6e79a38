// The CPU decode step's small ops, one call each where torch needs several: a residual add fused with
// RMSNorm, rotary embedding in place, and one query row's attention over an f32/f16 cache (the new
// key and value stored first). At SmolLM2's size (576 wide, 9 heads, 30 layers) a decode step is
// ~100 torch calls per layer of a few microseconds each; these replace most of them.
//
//   qk_add_rms_norm  x_out = x (+ a);  h = x_out / sqrt(mean(x_out^2) + eps) * w        rows of n
//   qk_rope          x (rows, d) rotated in place by (cos, sin) of its position, adjacent pairs
//                    (x[2i], x[2i+1]) or NeoX halves (x[i], x[i + d/2])
//   qk_attn_decode   store k, v at one slot of a layer's cache; out = softmax(q K^T * scale) V per
//                    query head over the cache rows the query sees (causal, sliding window, ring)
//   qk_glu           silu(g) u or gelu_tanh(g) u (the gated FFN's middle)
//   qk_decode_layer  a whole transformer block for one token (llama's and Gemma 3's, by flags), the
//                    ops above and qk_matmul in sequence: one call from Python per layer instead of
//                    ~15 (each call through ctypes costs 5-15 us, a third of a 2-thread SmolLM2 step)
//
// Arithmetic in float32 (f16 cache values converted on load); results equal torch's to float
// rounding (sums in another order). Built with qmatmul.cpp into one library (runtime/cpu/build.py).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "half.h"
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline float h2f(uint16_t h) { return half_to_float(h); }
static inline uint16_t f2h(float f) { return float_to_half(f); }

// the cache row as float32 (f16 or f32 storage)
static inline void load_row(const void* base, int kv_f16, int64_t idx, int d, float* dst) {
    if (kv_f16) {
        const uint16_t* p = (const uint16_t*)base + idx * d;
        int i = 0;
#if defined(__AVX512F__)
        for (; i + 16 <= d; i += 16) _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + i))));
#elif defined(__F16C__)
        for (; i + 8 <= d; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + i))));
#endif
        for (; i < d; i++) dst[i] = h2f(p[i]);
    } else {
        std::memcpy(dst, (const float*)base + idx * d, 4 * (size_t)d);
    }
}

// q . k for one head and one key row: SIMD partial sums, then one tree reduction (a reduction clause
// left to the compiler summed the 16 lanes one after another: 3/4 of the attention's time)
static inline float dotf(const float* __restrict a, const float* __restrict b, int n) {
    int i = 0;
    float s = 0.0f;
#if defined(__AVX512F__)
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
    }
    for (; i + 16 <= n; i += 16) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    const __m256 t = _mm256_add_ps(acc0, acc1);
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    s = _mm_cvtss_f32(r);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

extern "C" {

// rows of n: x_out = x + a (a may be null: x_out = x), h = rms_norm(x_out) * w. x_out may be x.
void qk_add_rms_norm(const float* x, const float* a, const float* w, int64_t rows, int64_t n, float eps,
                     float* x_out, float* h, int n_threads) {
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1 && rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        const float* xr = x + r * n;
        float* xo = x_out + r * n;
        if (a) {
            const float* ar = a + r * n;
#pragma omp simd
            for (int64_t i = 0; i < n; i++) xo[i] = xr[i] + ar[i];
        } else if (xo != xr) {
            std::memcpy(xo, xr, 4 * (size_t)n);
        }
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < n; i++) ss += xo[i] * xo[i];
        const float inv = 1.0f / std::sqrt(ss / (float)n + eps);
        float* hr = h + r * n;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) hr[i] = xo[i] * inv * w[i];
    }
}

// x: (heads, T, d) contiguous, rotated in place; cos, sin: (T, d/2)
void qk_rope(float* x, int64_t heads, int64_t T, int64_t d, const float* cos_, const float* sin_, int neox) {
    const int64_t half = d / 2;
    for (int64_t r = 0; r < heads * T; r++) {
        float* xr = x + r * d;
        const float* c = cos_ + (r % T) * half;
        const float* s = sin_ + (r % T) * half;
        if (neox) {
            for (int64_t i = 0; i < half; i++) {
                const float x0 = xr[i], x1 = xr[i + half];
                xr[i] = x0 * c[i] - x1 * s[i];
                xr[i + half] = x0 * s[i] + x1 * c[i];
            }
        } else {
            for (int64_t i = 0; i < half; i++) {
                const float x0 = xr[2 * i], x1 = xr[2 * i + 1];
                xr[2 * i] = x0 * c[i] - x1 * s[i];
                xr[2 * i + 1] = x0 * s[i] + x1 * c[i];
            }
        }
    }
}

// exp(x) for x <= 0 as a polynomial the compiler vectorizes (libm's expf is a call per value):
// x = n ln2 + r, |r| <= ln2/2, e^r by its Taylor series to r^7 (relative error < 2e-7, float rounding)
static inline float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = std::floor(x * 1.44269504088896341f + 0.5f);
    const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, 4);
    return p * scale;
}

static const int MAX_GROUP = 64;  // query heads per KV head this kernel takes (GQA ratios are <= 16 in practice)

// One query position `pos`. q (H, d), k, v (G, d) float32 (H a multiple of G: query head h reads KV
// head h / (H / G)). K, V: the layer's cache, (G, cap, d) f16 (kv_f16) or f32; k, v go to row `slot`.
// The query sees rows [0, S): with ring == 0 row j holds position j; with a ring of `ring` rows, row
// j holds the last position p <= pos with p % ring == j (none when negative). window > 0: only
// positions > pos - window. out (H, d) float32. Returns 0, or -1 for bad arguments.
//
// The keys are split into one range per thread (any number of KV heads, Gemma's one included); each
// range keeps its own running max, sum and weighted values per head (flash-decoding), merged at the
// end. Each K and V row is converted once and used by every query head that shares it.
int qk_attn_decode(const float* q, const float* k, const float* v, int64_t H, int64_t G, int64_t d, void* K,
                   void* V, int kv_f16, int64_t cap, int64_t slot, int64_t S, int64_t pos, int64_t window,
                   int64_t ring, float scale, float* out, int n_threads) {
    if (G < 1 || H % G != 0 || H / G > MAX_GROUP || slot < 0 || slot >= cap || S < 1 || S > cap || d < 1)
        return -1;
    for (int64_t g = 0; g < G; g++) {  // store the new row
        const int64_t at = g * cap + slot;
        if (kv_f16) {
            for (int64_t i = 0; i < d; i++) {
                ((uint16_t*)K)[at * d + i] = f2h(k[g * d + i]);
                ((uint16_t*)V)[at * d + i] = f2h(v[g * d + i]);
            }
        } else {
            std::memcpy((float*)K + at * d, k + g * d, 4 * (size_t)d);
            std::memcpy((float*)V + at * d, v + g * d, 4 * (size_t)d);
        }
    }
    const int64_t per = H / G;
    int nt = n_threads < 1 ? 1 : n_threads;
    if (S * H * d < (1 << 16)) nt = 1;  // too little work to share
    if (nt > S) nt = (int)S;
    // per thread: max (H), sum (H), weighted values (H, d)
    std::vector<float> part_m(nt * H, -INFINITY), part_l(nt * H, 0.0f), part_acc((size_t)nt * H * d, 0.0f);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#ifdef _OPENMP
        const int t = omp_get_thread_num();
#else
        const int t = 0;
#endif
        const int64_t j0 = S * t / nt, j1 = S * (t + 1) / nt, n = j1 - j0;
        std::vector<float> s((size_t)per * n), row(d);
        std::vector<uint8_t> live(n);
        for (int64_t jj = 0; jj < n; jj++) {
            const int64_t j = j0 + jj;
            const int64_t p = ring ? j + ring * ((pos - j) >= 0 ? (pos - j) / ring : -1) : j;
            live[jj] = !(p < 0 || p > pos || (window > 0 && p <= pos - window));
        }
        for (int64_t g = 0; g < G; g++) {
            float* m = part_m.data() + t * H + g * per;
            float* l = part_l.data() + t * H + g * per;
            float* acc = part_acc.data() + ((size_t)t * H + g * per) * d;
            for (int64_t jj = 0; jj < n; jj++) {  // scores, (per, n)
                if (!live[jj]) continue;
                load_row(K, kv_f16, g * cap + j0 + jj, (int)d, row.data());
                for (int64_t e = 0; e < per; e++) s[e * n + jj] = dotf(q + (g * per + e) * d, row.data(), (int)d) * scale;
            }
            for (int64_t e = 0; e < per; e++) {  // softmax numerators
                float* se = s.data() + e * n;
                float mx = -INFINITY;
                for (int64_t jj = 0; jj < n; jj++)
                    if (live[jj] && se[jj] > mx) mx = se[jj];
                m[e] = mx;
                if (mx == -INFINITY) continue;  // nothing this range can see
                float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                for (int64_t jj = 0; jj < n; jj++) {
                    const float pj = live[jj] ? exp_neg(se[jj] - mx) : 0.0f;
                    se[jj] = pj;
                    sum += pj;
                }
                l[e] = sum;
            }
            for (int64_t jj = 0; jj < n; jj++) {  // weighted values
                if (!live[jj]) continue;
                load_row(V, kv_f16, g * cap + j0 + jj, (int)d, row.data());
                for (int64_t e = 0; e < per; e++) {
                    const float pj = s[e * n + jj];
                    float* ae = acc + e * d;
#pragma omp simd
                    for (int64_t i = 0; i < d; i++) ae[i] += pj * row[i];
                }
            }
        }
    }
    for (int64_t h = 0; h < H; h++) {  // merge the ranges
        float M = -INFINITY;
        for (int t = 0; t < nt; t++) M = part_m[t * H + h] > M ? part_m[t * H + h] : M;
        float L = 0.0f;
        float* o = out + h * d;
        for (int64_t i = 0; i < d; i++) o[i] = 0.0f;
        for (int t = 0; t < nt; t++) {
            if (part_m[t * H + h] == -INFINITY) continue;
            const float w = nt == 1 ? 1.0f : exp_neg(part_m[t * H + h] - M);
            L += w * part_l[t * H + h];
            const float* a = part_acc.data() + ((size_t)t * H + h) * d;
            for (int64_t i = 0; i < d; i++) o[i] += w * a[i];
        }
        for (int64_t i = 0; i < d; i++) o[i] /= L;
    }
    return 0;
}

// -- a whole block for one token --------------------------------------------------------------------

int qk_matmul(int type, const uint8_t* w, int64_t row_stride, int64_t N, int64_t K, const float* x, int64_t T,
              float* y, int n_threads);  // qmatmul.cpp

struct QkWeight {     // one GGUF matrix (N rows of K values), its bytes in place
    const uint8_t* data;
    int64_t row_stride, N, K;
    int32_t type, pad;
};

// The block, fixed fields first (set once per model and layer), then the ones a step sets. Mirrored
// field for field by runtime/cpu/layer.py's ctypes Structure.
struct QkLayer {
    QkWeight wq, wk, wv, wo, gate, up, down;
    const float *bq, *bk, *bv;                   // biases (qkv_bias), or null
    const float *q_norm, *k_norm;                // per-head RMSNorm weights (qk_norm), or null
    const float *post_attn_norm, *post_ffn_norm; // Gemma 3's norms after attention and FFN, or null
    const float *ffn_norm, *next_norm;           // the FFN's input norm; the norm after the block
    int64_t n_embd, n_head, n_head_kv, head_dim, n_ff;
    float eps, q_scale;                          // q_scale: q multiplied by it after rope (1: none)
    float kq_scale;                              // the scores' 1/sqrt(head_dim), as the caller rounds it
    int32_t neox, gelu;                          // rope pairs; FFN gate gelu_tanh (1) or silu (0)
    int64_t window;                              // sliding window (0: none)
    // per step
    void *K, *V;                                 // this layer's cache rows (n_kv, cap, d)
    int64_t cap, ring, pos;
    int32_t kv_f16, n_threads;
    const float *cos_, *sin_;                    // (d/2) for this token and this layer's rope
    const float *x, *h;                          // the residual stream and its normed copy (n_embd)
    float *x_out, *h_out;                        // the block's outputs (n_embd each)
};

static inline void add_bias(float* y, const float* b, int64_t n) {
    if (b)
        for (int64_t i = 0; i < n; i++) y[i] += b[i];
}

static inline float sigmoid(float v) {  // 1 / (1 + e^-v) through exp_neg on either side of 0
    const float e = exp_neg(-std::fabs(v));
    return v >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

// out = act(g) u over n values: act gelu_tanh (gelu) or silu; out may be g. The unfused path calls this
// too (ops.swiglu / ops.geglu on the CPU), so both paths round alike.
void qk_glu(const float* g, const float* u, int64_t n, int gelu, float* out) {
    if (gelu) {  // tanh(y) = sign(y) (1 - e^-2|y|) / (1 + e^-2|y|)
#pragma omp simd
        for (int64_t i = 0; i < n; i++) {
            const float y = 0.7978845608028654f * (g[i] + 0.044715f * g[i] * g[i] * g[i]);
            const float e = exp_neg(-2.0f * std::fabs(y)), t = std::copysign((1.0f - e) / (1.0f + e), y);
            out[i] = 0.5f * g[i] * (1.0f + t) * u[i];
        }
    } else {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) out[i] = g[i] * sigmoid(g[i]) * u[i];
    }
}

// returns 0, or the failing step (1: a matmul, 2: attention)
int qk_decode_layer(const QkLayer* L) {
    const int64_t E = L->n_embd, H = L->n_head, G = L->n_head_kv, d = L->head_dim, F = L->n_ff;
    const int nt = L->n_threads;
    static thread_local std::vector<float> ws;
    ws.resize((size_t)(2 * H * d + 2 * G * d + 2 * E + 2 * F));
    float *q = ws.data(), *k = q + H * d, *v = k + G * d, *att = v + G * d, *a = att + H * d, *g = a + E,
          *u = g + F, *f = u + F;
    auto mm = [&](const QkWeight& w, const float* in, float* out) {
        return qk_matmul(w.type, w.data, w.row_stride, w.N, w.K, in, 1, out, nt);
    };
    if (mm(L->wq, L->h, q) || mm(L->wk, L->h, k) || mm(L->wv, L->h, v)) return 1;
    add_bias(q, L->bq, H * d);
    add_bias(k, L->bk, G * d);
    add_bias(v, L->bv, G * d);
    if (L->q_norm) qk_add_rms_norm(q, nullptr, L->q_norm, H, d, L->eps, q, q, 1);
    if (L->k_norm) qk_add_rms_norm(k, nullptr, L->k_norm, G, d, L->eps, k, k, 1);
    qk_rope(q, H, 1, d, L->cos_, L->sin_, L->neox);
    qk_rope(k, G, 1, d, L->cos_, L->sin_, L->neox);
    if (L->q_scale != 1.0f)
        for (int64_t i = 0; i < H * d; i++) q[i] *= L->q_scale;
    const int64_t slot = L->ring ? L->pos % L->ring : L->pos;
    const int64_t S = L->ring ? (L->pos + 1 < L->ring ? L->pos + 1 : L->ring) : L->pos + 1;
    if (qk_attn_decode(q, k, v, H, G, d, L->K, L->V, L->kv_f16, L->cap, slot, S, L->pos, L->window, L->ring,
                       L->kq_scale, att, nt))
        return 2;
    if (mm(L->wo, att, a)) return 1;
    if (L->post_attn_norm) qk_add_rms_norm(a, nullptr, L->post_attn_norm, 1, E, L->eps, a, a, 1);
    float* x1 = L->x_out;  // x + a, then the FFN's output added in place
    qk_add_rms_norm(L->x, a, L->ffn_norm, 1, E, L->eps, x1, L->h_out, 1);
    if (mm(L->gate, L->h_out, g) || mm(L->up, L->h_out, u)) return 1;
    qk_glu(g, u, F, L->gelu, g);
    if (mm(L->down, g, f)) return 1;
    if (L->post_ffn_norm) qk_add_rms_norm(f, nullptr, L->post_ffn_norm, 1, E, L->eps, f, f, 1);
    qk_add_rms_norm(x1, f, L->next_norm, 1, E, L->eps, x1, L->h_out, 1);
    return 0;
}

}  // extern "C"
