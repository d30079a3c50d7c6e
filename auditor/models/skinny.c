/* Float32 matrix products with few rows, for x86-64 CPUs with AVX2 and FMA.
 *
 *     y[M, N] = x[M, K] . w[N, K]^T (+ bias[N])
 *
 * x, w and y are row-major and contiguous; w is a linear layer's weight as stored
 * ([out_features, in_features]). Built and loaded by auditor/models/skinny.py.
 *
 * A general BLAS blocks for large products: with a few rows it reads every weight once per
 * handful of flops and waits on memory. Here the weights stream through once: threads split
 * the output columns, each takes them three at a time (a block of three weight rows, a few KB,
 * which stays in L1 while every group of four input rows is multiplied with it), and the block
 * two ahead is prefetched while the first group runs. Each output is a dot product over K in
 * eight float lanes summed at the end, so the result does not depend on the thread count.
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <float.h>
#include <math.h>

#define NR 3        /* output columns per block */
#define MR 4        /* input rows per micro-kernel call */
#define AHEAD 2     /* blocks prefetched ahead */

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Rows m..m+rows-1 (rows is MR or 1) times weight rows n..n+cols-1 (cols <= NR), which are the
 * rows wb, wb + K, ... With do_prefetch, each step also prefetches the matching part of the NR
 * weight rows at prefetch. */
static inline __attribute__((always_inline)) void block(const float *x, const float *wb, const float *bias, float *y, int64_t N, int64_t K,
                         int64_t m, int rows, int64_t n, int cols, int do_prefetch, const float *prefetch, int accumulate) {
    const float *xr[MR], *wr[NR];
    __m256 acc[MR][NR];
    for (int i = 0; i < MR; i++) xr[i] = x + (m + (i < rows ? i : 0)) * K;
    for (int j = 0; j < NR; j++) wr[j] = wb + (j < cols ? j : 0) * K;
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_ps();
    const int64_t K8 = K & ~(int64_t)7;
    if (rows == MR) {
        for (int64_t k = 0; k < K8; k += 8) {
            if (do_prefetch)
                for (int j = 0; j < NR; j++) _mm_prefetch((const char *)(prefetch + j * K + k), _MM_HINT_T0);
            __m256 v[NR];
            for (int j = 0; j < NR; j++) v[j] = _mm256_loadu_ps(wr[j] + k);
            for (int i = 0; i < MR; i++) {
                __m256 u = _mm256_loadu_ps(xr[i] + k);
                for (int j = 0; j < NR; j++) acc[i][j] = _mm256_fmadd_ps(u, v[j], acc[i][j]);
            }
        }
    } else {
        for (int64_t k = 0; k < K8; k += 8) {
            if (do_prefetch)
                for (int j = 0; j < NR; j++) _mm_prefetch((const char *)(prefetch + j * K + k), _MM_HINT_T0);
            __m256 v[NR];
            for (int j = 0; j < NR; j++) v[j] = _mm256_loadu_ps(wr[j] + k);
            __m256 u = _mm256_loadu_ps(xr[0] + k);
            for (int j = 0; j < NR; j++) acc[0][j] = _mm256_fmadd_ps(u, v[j], acc[0][j]);
        }
    }
    /* Horizontal sums four at a time (hadd tree); the tails past K8 are added after. */
    float sums[MR * NR + 4];
    {
        __m256 *flat = &acc[0][0];
        int t = 0;
        for (; t + 4 <= MR * NR; t += 4) {
            __m256 h0 = _mm256_hadd_ps(flat[t], flat[t + 1]);
            __m256 h1 = _mm256_hadd_ps(flat[t + 2], flat[t + 3]);
            __m256 h2 = _mm256_hadd_ps(h0, h1);
            _mm_storeu_ps(sums + t, _mm_add_ps(_mm256_castps256_ps128(h2), _mm256_extractf128_ps(h2, 1)));
        }
        for (; t < MR * NR; t++) sums[t] = hsum(flat[t]);
    }
#pragma GCC unroll 4
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 3
        for (int j = 0; j < NR; j++) {
            if (i >= rows || j >= cols) continue;
            float s = sums[i * NR + j];
            for (int64_t k = K8; k < K; k++) s += xr[i][k] * wr[j][k];
            if (bias) s += bias[n + j];
            float *out = y + (m + i) * N + n + j;
            *out = accumulate ? *out + s : s;
        }
}

/* ---- Weights held as 4-bit codes ----
 *
 * A model converted from a 4-bit file (the default model's GGUF is Q4_1) has float32 weights
 * that are exactly w = scale * q + min (a float32 product, then a float32 sum) with q in 0..15,
 * one scale and one min per 32 values along a row. auditor_q4_pack finds that form where every
 * block has it (checked bit for bit); the products then read 6 bits a weight instead of 32 and
 * turn each block's NR rows back into the same float32 values in an L1 buffer before the
 * micro-kernel runs on them: the same arithmetic as on the float32 weights, so the same results
 * to the bit, with about a fifth of the memory traffic (at 16 rows the products wait on it).
 *
 * Codes of row r: 16 bytes a block of 32, byte j holding value j (low nibble) and value j + 16
 * (high nibble); scale and min [N, K / 32]. */
typedef struct {
    const uint8_t *codes;
    const float *scale, *minv;
} q4w;

/* The same float32 product, then sum, for every value (kept apart from fused multiply-adds: the
 * empty asm makes the product a value of its own). */
static inline __m256 q4_value(__m256i q, __m256 d, __m256 m) {
    __m256 p = _mm256_mul_ps(_mm256_cvtepi32_ps(q), d);
    __asm__("" : "+x"(p));
    return _mm256_add_ps(p, m);
}

/* Block b of row r (nb blocks a row) into o[0..31] (32-byte aligned). */
static inline __attribute__((always_inline)) void q4_row_block(const q4w *qw, int64_t r, int64_t nb, int64_t b, float *o) {
    const int64_t at = r * nb + b;
    const __m128i low = _mm_set1_epi8(0x0F);
    __m128i q = _mm_loadu_si128((const __m128i *)(qw->codes + 16 * at));
    __m128i lo = _mm_and_si128(q, low), hi = _mm_and_si128(_mm_srli_epi16(q, 4), low);
    __m256 d = _mm256_set1_ps(qw->scale[at]), m = _mm256_set1_ps(qw->minv[at]);
    _mm256_store_ps(o, q4_value(_mm256_cvtepu8_epi32(lo), d, m));
    _mm256_store_ps(o + 8, q4_value(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)), d, m));
    _mm256_store_ps(o + 16, q4_value(_mm256_cvtepu8_epi32(hi), d, m));
    _mm256_store_ps(o + 24, q4_value(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)), d, m));
}

/* Row r's K values (K a multiple of 32) into dst (32-byte aligned). */
static void q4_row(const q4w *qw, int64_t r, int64_t K, float *dst) {
    const int64_t nb = K / 32;
    for (int64_t b = 0; b < nb; b++) q4_row_block(qw, r, nb, b, dst + 32 * b);
}

static inline uint32_t bits_of(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, sizeof u);
    return u;
}

/* a and b the same float bit for bit, or zeros of either sign (see auditor_q4_pack). */
static inline int same_value(float a, float b) { return bits_of(a) == bits_of(b) || ((bits_of(a) | bits_of(b)) & 0x7FFFFFFFu) == 0; }

/* Whether row r of w [N, K] holds what its codes give back (bit for bit; zeros of either sign alike).
 *
 * A weight written through torch's ``.data`` moves no version counter, so its kept codes would
 * go on being read with other values in the float32 weight. Each product that reads codes checks
 * one row of its weight first (the caller turns the row over from call to call: every row within
 * N calls), and refuses to run from codes that no longer match. With the codes' d and m normal,
 * as auditor_q4_pack gives them, and no subnormal weight, neither flushing nor reading subnormals
 * as zero changes what this compares. */
static int q4_row_same(const float *w, const q4w *qw, int64_t r, int64_t K) {
    const int64_t nb = K / 32;
    float back[32] __attribute__((aligned(32)));
    for (int64_t b = 0; b < nb; b++) {
        q4_row_block(qw, r, nb, b, back);
        for (int i = 0; i < 32; i++)
            if (!same_value(back[i], w[r * K + 32 * b + i])) return 0;
    }
    return 1;
}

/* This thread's buffer of at least n floats (32-byte aligned), or NULL. Kept for the next call on
 * the thread and freed when the thread ends. */
static pthread_key_t q4_key;
static pthread_once_t q4_once = PTHREAD_ONCE_INIT;
static int q4_keyed;
static void q4_make_key(void) { q4_keyed = pthread_key_create(&q4_key, free) == 0; }

static float *q4_buffer(int64_t n) {
    pthread_once(&q4_once, q4_make_key);
    if (!q4_keyed) return NULL;
    /* The allocation's first 32 bytes hold its capacity; the floats follow. */
    char *held = pthread_getspecific(q4_key);
    if (held && *(int64_t *)held >= n) return (float *)(held + 32);
    char *fresh = aligned_alloc(32, 32 + (size_t)((n + 7) & ~(int64_t)7) * sizeof(float));
    if (!fresh || pthread_setspecific(q4_key, fresh)) {
        free(fresh);
        return NULL;
    }
    free(held);
    *(int64_t *)fresh = n;
    return (float *)(fresh + 32);
}

/* y = x . w^T (+ bias), or y += that. With qw, the block's weight rows come from its codes (w
 * is the same weight as float32, read only where no buffer can be had). */
static inline __attribute__((always_inline)) void linear(const float *x, const float *w, const q4w *qw, const float *bias, float *y,
                                                         int64_t M, int64_t N, int64_t K, int threads, int accumulate) {
    if (M <= 0 || N <= 0) return;
    const int64_t blocks = (N + NR - 1) / NR;
#pragma omp parallel num_threads(threads)
    {
        float *buf = qw ? q4_buffer(NR * K) : NULL;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t n = b * NR;
            const int cols = N - n < NR ? (int)(N - n) : NR;
            const int64_t ahead = n + AHEAD * NR;
            const float *prefetch = w + (ahead + NR <= N ? ahead : n) * K;
            const float *wb = w + n * K;
            int64_t m = 0;
            if (buf) {
                /* The codes two blocks on (a block's rows are adjacent), then this block's rows. */
                const char *next = (const char *)(qw->codes + (ahead + NR <= N ? ahead : n) * (K / 2));
                for (int64_t at = 0; at < NR * K / 2; at += 64) _mm_prefetch(next + at, _MM_HINT_T0);
                for (int j = 0; j < cols; j++) q4_row(qw, n + j, K, buf + j * K);
                wb = buf;
            } else if (M >= MR) {
                /* The first call prefetches (each call site is specialized: rows and prefetch are constants there). */
                block(x, wb, bias, y, N, K, 0, MR, n, cols, 1, prefetch, accumulate);
                m = MR;
            } else {
                block(x, wb, bias, y, N, K, 0, 1, n, cols, 1, prefetch, accumulate);
                m = 1;
            }
            for (; m + MR <= M; m += MR) block(x, wb, bias, y, N, K, m, MR, n, cols, 0, prefetch, accumulate);
            for (; m < M; m++) block(x, wb, bias, y, N, K, m, 1, n, cols, 0, prefetch, accumulate);
        }
    }
}

void auditor_skinny_linear(const float *x, const float *w, const float *bias, float *y, int64_t M, int64_t N,
                           int64_t K, int threads) {
    linear(x, w, NULL, bias, y, M, N, K, threads, 0);
}

/* y += x . w^T (+ bias): a residual connection added in place (each output is y + (x.w + bias),
 * rounded as torch rounds ``y + F.linear(x, w, bias)``). */
void auditor_skinny_linear_add(const float *x, const float *w, const float *bias, float *y, int64_t M, int64_t N,
                               int64_t K, int threads) {
    linear(x, w, NULL, bias, y, M, N, K, threads, 1);
}

/* The same products (accumulate: the residual form) with the weight's codes from auditor_q4_pack;
 * w is the weight as float32 (read only where no buffer can be had). check, where 0 .. N - 1, is
 * a row of w to compare with its codes first (q4_row_same): returns 1, computing nothing, where
 * they differ, else 0. */
int auditor_skinny_linear_q4(const float *x, const float *w, const uint8_t *codes, const float *scale, const float *minv,
                             const float *bias, float *y, int64_t M, int64_t N, int64_t K, int threads, int accumulate,
                             int64_t check) {
    const q4w qw = {codes, scale, minv};
    if (check >= 0 && check < N && !q4_row_same(w, &qw, check, K)) return 1;
    if (accumulate)
        linear(x, w, &qw, bias, y, M, N, K, threads, 1);
    else
        linear(x, w, &qw, bias, y, M, N, K, threads, 0);
    return 0;
}

/* Whether f is a subnormal float (exponent bits 0, a mantissa): a thread that flushes those to zero
 * would compute with other values. */
static inline int subnormal(float f) { return (bits_of(f) & 0x7F800000u) == 0 && (bits_of(f) & 0x007FFFFFu) != 0; }

/* One block's codes for values v[0..31] given scale d and min m, or 0 where some value is not
 * d * q + m for any q in 0..15. (With d and m normal and no v subnormal, neither the product nor
 * the sum is: flushing subnormals changes nothing.) */
static int q4_codes(const float *v, float d, float m, uint8_t *q) {
    for (int i = 0; i < 32; i++) {
        float t = d > 0.0f ? rintf((v[i] - m) / d) : 0.0f;
        int c = t < 0.0f ? 0 : t > 15.0f ? 15 : (int)t, hit = 0;
        for (int step = 0; step < 3 && !hit; step++) {
            int cand = c + (step == 1 ? -1 : step == 2 ? 1 : 0);
            if (cand < 0 || cand > 15) continue;
            float p = (float)cand * d;
            __asm__("" : "+x"(p)); /* the product rounded on its own, as q4_value's */
            float r = p + m;
            if (same_value(r, v[i])) q[i] = (uint8_t)cand, hit = 1;
        }
        if (!hit) return 0;
    }
    return 1;
}

static inline float half_round(float f, int nudge) { /* f to float16 and back, nudged by nudge float16 steps */
    unsigned short h = (unsigned short)(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT) + nudge);
    return _cvtsh_ss(h);
}

/* w [N, K] (K a multiple of 32) as 4-bit codes (see q4w): codes [N, K / 2], scale and minv
 * [N, K / 32]. Returns 0 when every block is exactly d * q + m (each value checked bit for bit
 * against what q4_row gives back, but for the sign of a zero: d * 0 + m can be +0 where the
 * weight holds -0, as Q4_0's d * (q - 8) with d < 0 gives, and a product's sum, started at +0,
 * is the same with either), else -1 (the codes are then of no use). A block's min is its
 * q = 0; its scale is tried as the span over 15 .. 1 steps, each as float16 (the width 4-bit files
 * store it in) and as float32. Values that are not finite or are subnormal refuse the weight (a
 * thread that flushes subnormals to zero, or reads them as zero, would compute with others); the
 * checks read bits, and run with flushing turned off on every thread (and turned back after). */
int auditor_q4_pack(const float *w, int64_t N, int64_t K, uint8_t *codes, float *scale, float *minv, int threads) {
    if (K <= 0 || K % 32) return -1;
    const int64_t nb = K / 32;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr & ~0x8040u); /* flush-to-zero (bit 15) and denormals-are-zero (bit 6) off */
#pragma omp for schedule(static)
    for (int64_t r = 0; r < N; r++) {
        for (int64_t b = 0; b < nb && !failed; b++) {
            const float *v = w + r * K + 32 * b;
            float lo = v[0], hi = v[0];
            int bad = 0;
            for (int i = 0; i < 32; i++) {
                if ((bits_of(v[i]) & 0x7F800000u) == 0x7F800000u || subnormal(v[i])) bad = 1;
                lo = v[i] < lo ? v[i] : lo;
                hi = v[i] > hi ? v[i] : hi;
            }
            uint8_t q[32];
            float d = 0.0f;
            int found = !bad && hi == lo && q4_codes(v, 0.0f, lo, q);
            for (int steps = 15; !bad && !found && steps >= 1; steps--) {
                const float span = (hi - lo) / (float)steps;
                const float tries[4] = {half_round(span, 0), span, half_round(span, 1), half_round(span, -1)};
                for (int t = 0; t < 4 && !found; t++)
                    if (tries[t] > 0.0f && tries[t] <= FLT_MAX && tries[t] >= FLT_MIN) d = tries[t], found = q4_codes(v, d, lo, q);
            }
            if (!found) {
                failed = 1;
                break;
            }
            uint8_t *c = codes + (r * nb + b) * 16;
            for (int j = 0; j < 16; j++) c[j] = (uint8_t)(q[j] | q[j + 16] << 4);
            scale[r * nb + b] = d;
            minv[r * nb + b] = lo;
        }
        if (!failed) {
            /* What the products will read, against the weight. */
            const q4w qw = {codes, scale, minv};
            failed = !q4_row_same(w, &qw, r, K);
        }
    }
    _mm_setcsr(csr);
    }
    return failed ? -1 : 0;
}

/* The same product with the weight stored the other way round, as an SAE's encoder is:
 *
 *     y[M, N] = x[M, K] . w[K, N] (+ bias[N])
 *
 * Threads split the columns in panels of 24 (three vectors of eight); for each group of four
 * rows, each step over K broadcasts one input value per row and multiplies it with the panel's
 * slice of that weight row. The panel (K x 96 bytes) stays in L2 across the row groups. Columns
 * past the last whole panel are summed one at a time. The summation order over K is the same
 * for every column, whatever the thread count. */
#define NV 3 /* vectors of eight columns per panel */

static inline __attribute__((always_inline)) void panel(const float *x, const float *w, const float *bias, float *y,
                                                        int64_t N, int64_t K, int64_t m, int rows, int64_t n) {
    __m256 acc[MR][NV];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NV; j++) acc[i][j] = _mm256_setzero_ps();
    const float *xr[MR];
    for (int i = 0; i < MR; i++) xr[i] = x + (m + (i < rows ? i : 0)) * K;
    for (int64_t k = 0; k < K; k++) {
        const float *wk = w + k * N + n;
        __m256 v[NV];
        for (int j = 0; j < NV; j++) v[j] = _mm256_loadu_ps(wk + 8 * j);
        if (rows == MR) {
            for (int i = 0; i < MR; i++) {
                __m256 u = _mm256_broadcast_ss(xr[i] + k);
                for (int j = 0; j < NV; j++) acc[i][j] = _mm256_fmadd_ps(u, v[j], acc[i][j]);
            }
        } else {
            __m256 u = _mm256_broadcast_ss(xr[0] + k);
            for (int j = 0; j < NV; j++) acc[0][j] = _mm256_fmadd_ps(u, v[j], acc[0][j]);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < MR; i++) {
        if (i >= rows) continue;
#pragma GCC unroll 3
        for (int j = 0; j < NV; j++) {
            __m256 out = acc[i][j];
            if (bias) out = _mm256_add_ps(out, _mm256_loadu_ps(bias + n + 8 * j));
            _mm256_storeu_ps(y + (m + i) * N + n + 8 * j, out);
        }
    }
}

void auditor_skinny_addmm_kn(const float *x, const float *w, const float *bias, float *y, int64_t M, int64_t N,
                             int64_t K, int threads) {
    if (M <= 0 || N <= 0) return;
    const int64_t panels = N / (8 * NV);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        const int64_t n = p * 8 * NV;
        int64_t m = 0;
        for (; m + MR <= M; m += MR) panel(x, w, bias, y, N, K, m, MR, n);
        for (; m < M; m++) panel(x, w, bias, y, N, K, m, 1, n);
    }
    for (int64_t n = panels * 8 * NV; n < N; n++)
        for (int64_t m = 0; m < M; m++) {
            float s = 0.0f;
            for (int64_t k = 0; k < K; k++) s += x[m * K + k] * w[k * N + n];
            y[m * N + n] = bias ? s + bias[n] : s;
        }
}

/* ---- The rest of a Llama-family decoder layer on few rows (auditor/models/lean.py) ----
 *
 * A streamed audit's chunk is a forward of ~16 tokens: the products above take half its time
 * and torch's small operations (norms, rotary embedding, attention over the cached keys,
 * SiLU) most of the rest, at a few microseconds of dispatch each. These do the same
 * arithmetic in one call each, to float rounding of torch's results.
 */
#include <omp.h>

/* exp(x) for eight floats: Cephes' expf (range reduction by ln 2, degree-5 polynomial; within
 * 2 ulp of expf). Overflow gives +inf, x below -87.3 gives 0, NaN stays NaN. */
static inline __m256 exp8(__m256 x) {
    const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365478515625f);
    __m256 big = _mm256_cmp_ps(x, hi, _CMP_GT_OQ), tiny = _mm256_cmp_ps(x, lo, _CMP_LT_OQ), nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    __m256 v = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(v, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    v = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), v);
    v = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), v);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(v, v), _mm256_add_ps(v, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), big);
    y = _mm256_blendv_ps(y, _mm256_setzero_ps(), tiny);
    return _mm256_blendv_ps(y, x, nan);
}

static inline float exp1(float x) {
    float in[8] = {x}, out[8];
    _mm256_storeu_ps(out, exp8(_mm256_loadu_ps(in)));
    return out[0];
}

/* y[m, :] = w * x[m, :] / sqrt(mean(x[m, :]^2) + eps), as LlamaRMSNorm (float32). */
void auditor_rmsnorm(const float *x, const float *w, float *y, int64_t M, int64_t D, float eps) {
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * D;
        float *yr = y + m * D;
        __m256 acc = _mm256_setzero_ps();
        int64_t d = 0;
        for (; d + 8 <= D; d += 8) {
            __m256 v = _mm256_loadu_ps(xr + d);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float s = hsum(acc);
        for (; d < D; d++) s += xr[d] * xr[d];
        const float r = 1.0f / sqrtf(s / (float)D + eps);
        const __m256 rv = _mm256_set1_ps(r);
        for (d = 0; d + 8 <= D; d += 8)
            _mm256_storeu_ps(yr + d, _mm256_mul_ps(_mm256_loadu_ps(w + d), _mm256_mul_ps(_mm256_loadu_ps(xr + d), rv)));
        for (; d < D; d++) yr[d] = w[d] * (xr[d] * r);
    }
}

/* The rotary embedding in place on x [M, heads, D] with cos, sin [M, D] (the rotate-half
 * convention: out = x * cos + cat(-x2, x1) * sin, x1 and x2 the halves of each head). */
void auditor_rope(float *x, const float *cos, const float *sin, int64_t M, int64_t heads, int64_t D) {
    const int64_t h = D / 2;
    for (int64_t m = 0; m < M; m++) {
        const float *c = cos + m * D, *s = sin + m * D;
        for (int64_t j = 0; j < heads; j++) {
            float *v = x + (m * heads + j) * D;
            for (int64_t d = 0; d < h; d++) {
                const float a = v[d], b = v[d + h];
                const float lo = a * c[d] + (-b) * s[d];
                const float hi2 = b * c[d + h] + a * s[d + h];
                v[d] = lo;
                v[d + h] = hi2;
            }
        }
    }
}

/* out = silu(g) * u = g / (1 + exp(-g)) * u, elementwise over n values (out may be g). */
void auditor_silu_mul(const float *g, const float *u, float *out, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(g + i);
        __m256 e = exp8(_mm256_xor_ps(v, sign));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(v, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
    for (; i < n; i++) out[i] = g[i] / (1.0f + exp1(-g[i])) * u[i];
}

/* One query against keys 0..T-1 and values ([T, D] rows): out = softmax(scale q.k) . v. score
 * holds T floats. D is a constant at the calls for 64 and 128, so the loops over it unroll. */
static inline __attribute__((always_inline)) void attend_one(const float *qr, const float *kb, const float *vb, float *o,
                                                             float *score, int64_t T, int64_t D, float scale) {
    int64_t t = 0;
    if (D == 64) { /* the query in eight registers, eight keys at a time, summed by one hadd tree */
        __m256 qv[8];
        for (int c = 0; c < 8; c++) qv[c] = _mm256_loadu_ps(qr + 8 * c);
        const __m256 sc = _mm256_set1_ps(scale);
        for (; t + 8 <= T; t += 8) {
            const float *k0 = kb + t * 64;
            __m256 r[8];
            for (int j = 0; j < 8; j++) r[j] = _mm256_mul_ps(qv[0], _mm256_loadu_ps(k0 + j * 64));
            for (int c = 1; c < 8; c++)
                for (int j = 0; j < 8; j++) r[j] = _mm256_fmadd_ps(qv[c], _mm256_loadu_ps(k0 + j * 64 + 8 * c), r[j]);
            const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(r[0], r[1]), _mm256_hadd_ps(r[2], r[3]));
            const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(r[4], r[5]), _mm256_hadd_ps(r[6], r[7]));
            const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
            _mm256_storeu_ps(score + t, _mm256_mul_ps(sums, sc));
        }
    }
    for (; t + 4 <= T; t += 4) { /* four keys at a time, summed by one hadd tree */
        const float *k0 = kb + t * D;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t d = 0; d < D; d += 8) {
            const __m256 qv = _mm256_loadu_ps(qr + d);
            a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + d), a0);
            a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + D + d), a1);
            a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 2 * D + d), a2);
            a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 3 * D + d), a3);
        }
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        const __m128 four = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        _mm_storeu_ps(score + t, _mm_mul_ps(four, _mm_set1_ps(scale)));
    }
    for (; t < T; t++) {
        __m256 a = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qr + d), _mm256_loadu_ps(kb + t * D + d), a);
        score[t] = hsum(a) * scale;
    }
    /* The largest score; a NaN wins, and spreads to the output as in torch. */
    __m256 topv8 = _mm256_set1_ps(-INFINITY), nan8 = _mm256_setzero_ps();
    for (t = 0; t + 8 <= T; t += 8) {
        const __m256 s = _mm256_loadu_ps(score + t);
        topv8 = _mm256_max_ps(topv8, s);
        nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(s, s, _CMP_UNORD_Q));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, topv8);
    float top = lanes[0];
    for (int j = 1; j < 8; j++) top = lanes[j] > top ? lanes[j] : top;
    for (; t < T; t++)
        if (score[t] > top || score[t] != score[t]) top = score[t];
    if (_mm256_movemask_ps(nan8)) top = NAN;
    const __m256 topv = _mm256_set1_ps(top);
    __m256 sumv = _mm256_setzero_ps();
    for (t = 0; t + 8 <= T; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(score + t), topv));
        _mm256_storeu_ps(score + t, e);
        sumv = _mm256_add_ps(sumv, e);
    }
    float sum = hsum(sumv);
    for (; t < T; t++) {
        score[t] = exp1(score[t] - top);
        sum += score[t];
    }
    const __m256 inv = _mm256_set1_ps(1.0f / sum);
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) { /* eight named accumulators: they stay in registers */
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (t = 0; t < T; t++) {
            const __m256 p = _mm256_set1_ps(score[t]);
            const float *vr = vb + t * D + d0;
            a0 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr), a0);
            a1 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8), a1);
            a2 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 16), a2);
            a3 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 24), a3);
            a4 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 32), a4);
            a5 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 40), a5);
            a6 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 48), a6);
            a7 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 56), a7);
        }
        float *od = o + d0;
        _mm256_storeu_ps(od, _mm256_mul_ps(a0, inv));
        _mm256_storeu_ps(od + 8, _mm256_mul_ps(a1, inv));
        _mm256_storeu_ps(od + 16, _mm256_mul_ps(a2, inv));
        _mm256_storeu_ps(od + 24, _mm256_mul_ps(a3, inv));
        _mm256_storeu_ps(od + 32, _mm256_mul_ps(a4, inv));
        _mm256_storeu_ps(od + 40, _mm256_mul_ps(a5, inv));
        _mm256_storeu_ps(od + 48, _mm256_mul_ps(a6, inv));
        _mm256_storeu_ps(od + 56, _mm256_mul_ps(a7, inv));
    }
    for (; d0 < D; d0 += 8) { /* what is left of the head, eight at a time */
        __m256 a = _mm256_setzero_ps();
        for (t = 0; t < T; t++) a = _mm256_fmadd_ps(_mm256_set1_ps(score[t]), _mm256_loadu_ps(vb + t * D + d0), a);
        _mm256_storeu_ps(o + d0, _mm256_mul_ps(a, inv));
    }
}

/* Causal attention of n new tokens against a stream's cache.
 *
 * q [n, Hq, D] (rotated), k_new and v_new [n, KV, D] (k rotated) are this forward's; the cache
 * holds KV heads of `cap` positions ([KV, cap, D] each), the first `held` filled. The new keys
 * and values are written at held..held+n-1; query i then attends to positions 0..held+i, query
 * head h to key head h / (Hq / KV). out [n, Hq, D]. D a multiple of 8. scratch holds threads x
 * (held + n) floats (each thread's scores). */
void auditor_attend(const float *q, const float *k_new, const float *v_new, float *k_cache, float *v_cache, int64_t cap,
                    int64_t held, int64_t n, int64_t Hq, int64_t KV, int64_t D, float scale, float *out, float *scratch,
                    int threads) {
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < KV; j++) {
            const int64_t src = (i * KV + j) * D, dst = (j * cap + held + i) * D;
            for (int64_t d = 0; d < D; d++) {
                k_cache[dst + d] = k_new[src + d];
                v_cache[dst + d] = v_new[src + d];
            }
        }
    const int64_t groups = Hq / KV, tasks = n * Hq, total = held + n;
#pragma omp parallel num_threads(threads)
    {
        float *score = scratch + (int64_t)omp_get_thread_num() * total;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; task++) {
            /* Tasks ordered by key head, so that a thread works through one head's keys and values
             * (held in its L2) before the next's. */
            const int64_t kv = task / (n * groups), rest = task % (n * groups), i = rest / groups;
            const int64_t h = kv * groups + rest % groups, T = held + i + 1;
            const float *qr = q + (i * Hq + h) * D, *kb = k_cache + kv * cap * D, *vb = v_cache + kv * cap * D;
            float *o = out + (i * Hq + h) * D;
            if (D == 64)
                attend_one(qr, kb, vb, o, score, T, 64, scale);
            else if (D == 128)
                attend_one(qr, kb, vb, o, score, T, 128, scale);
            else
                attend_one(qr, kb, vb, o, score, T, D, scale);
        }
    }
}

/* Product j of layer l's codes in auditor_layers' quant (codes NULL: none). */
static inline q4w q4_of(const void *const *quant, int64_t l, int j) {
    const void *const *at = quant + 21 * l + 3 * j;
    return (q4w){(const uint8_t *)at[0], (const float *)at[1], (const float *)at[2]};
}

/* Whole decoder layers, the calls above in one: what auditor/models/lean.py runs for the layers
 * before the audited one (and that one, when its output is what is audited).
 *
 * x [n, d] (the embeddings) becomes the last layer's output. weights holds 16 pointers a layer:
 * input norm, post-attention norm, then weight and bias (NULL: none) of q, k, v, o, gate, up and
 * down; params 3 floats a layer: the two norms' epsilons and the attention's scale. Stream s has
 * rows spans[2s] .. spans[2s] + spans[2s+1] - 1 of x, held[s] tokens in its cache, and for layer
 * l the key and value buffers caches[2 (s count + l)] and caches[2 (s count + l) + 1] of
 * caps[s count + l] positions. h, q, k, v, attn, gate and up are scratch rows ([n, d], [n, hq hd],
 * [n, kv hd] twice, [n, hq hd], [n, inter] twice); scratch as for auditor_attend. quant, where not
 * NULL, holds 21 pointers a layer: codes, scale and min (auditor_q4_pack) of q, k, v, o, gate, up
 * and down, codes NULL for a product of the float32 weight. Where turn >= 0, row (turn mod its
 * rows) of every weight read from codes is first compared with them (q4_row_same), stale[7 l + j]
 * set to 1 for product j of layer l where they differ (0 elsewhere); returns how many differ, and
 * where any does, computes nothing (x and the caches are as they were). */
int64_t auditor_layers(float *x, int64_t n, int64_t d, int64_t count, const float *const *weights, const float *params,
                       int64_t hq, int64_t kv, int64_t hd, int64_t inter, const float *cos, const float *sin, int64_t streams,
                       const int64_t *spans, const int64_t *held, float *const *caches, const int64_t *caps, float *h, float *q,
                       float *k, float *v, float *attn, float *gate, float *up, float *scratch, const void *const *quant,
                       int threads, int64_t turn, uint8_t *stale) {
    if (quant && turn >= 0) {
        /* Each product's rows and depth: q, k, v, o, gate, up, down. */
        const int64_t rows[7] = {hq * hd, kv * hd, kv * hd, d, inter, inter, d}, depth[7] = {d, d, d, hq * hd, d, d, inter};
        int64_t differ = 0;
        for (int64_t l = 0; l < count; l++)
            for (int j = 0; j < 7; j++) {
                const q4w qw = q4_of(quant, l, j);
                const int bad = qw.codes && rows[j] > 0 && !q4_row_same(weights[16 * l + 2 + 2 * j], &qw, turn % rows[j], depth[j]);
                stale[7 * l + j] = (uint8_t)bad;
                differ += bad;
            }
        if (differ) return differ;
    }
    for (int64_t l = 0; l < count; l++) {
        const float *const *w = weights + 16 * l;
        const float *pr = params + 3 * l;
        q4w qs[7];
        const q4w *qp[7];
        for (int j = 0; j < 7; j++) {
            qs[j] = quant ? q4_of(quant, l, j) : (q4w){NULL, NULL, NULL};
            qp[j] = qs[j].codes ? &qs[j] : NULL;
        }
        auditor_rmsnorm(x, w[0], h, n, d, pr[0]);
        linear(h, w[2], qp[0], w[3], q, n, hq * hd, d, threads, 0);
        linear(h, w[4], qp[1], w[5], k, n, kv * hd, d, threads, 0);
        linear(h, w[6], qp[2], w[7], v, n, kv * hd, d, threads, 0);
        auditor_rope(q, cos, sin, n, hq, hd);
        auditor_rope(k, cos, sin, n, kv, hd);
        for (int64_t s = 0; s < streams; s++) {
            const int64_t a = spans[2 * s], len = spans[2 * s + 1], at = s * count + l;
            auditor_attend(q + a * hq * hd, k + a * kv * hd, v + a * kv * hd, caches[2 * at], caches[2 * at + 1], caps[at], held[s],
                           len, hq, kv, hd, pr[2], attn + a * hq * hd, scratch, threads);
        }
        linear(attn, w[8], qp[3], w[9], x, n, d, hq * hd, threads, 1);
        auditor_rmsnorm(x, w[1], h, n, d, pr[1]);
        linear(h, w[10], qp[4], w[11], gate, n, inter, d, threads, 0);
        linear(h, w[12], qp[5], w[13], up, n, inter, d, threads, 0);
        auditor_silu_mul(gate, up, gate, n * inter);
        linear(gate, w[14], qp[6], w[15], x, n, d, inter, threads, 1);
    }
    return 0;
}

/* The rest of a TopK SAE's encode of a few rows, after the encoder product, in one call (each
 * torch operation of it cost several times its work right after a forward):
 *
 *   codes:   the k largest pre-activations of each row (NaN above every number; among equal
 *            values at the k-th place the earlier latents, where torch.topk's choice is
 *            unspecified), ReLU'd (NaN and -0.0 stay);
 *   picked:  [N, places] the codes at the watched latents: slot[latent] in 0..m (m: unwatched),
 *            place_slot[p] the slot that watched place p reads;
 *   err:     [N] with w_dec: ||x - x_hat|| / ||x|| (||x - x_hat|| where ||x|| is 0 or NaN), x_hat
 *            the sum of each code times its W_dec row, plus b_dec, times scale (what undoes a
 *            global input scaling; 1 for none).
 *
 * out holds picked, then err. Returns 0, or -1 when scratch memory cannot be had or a slot is
 * outside 0..m. */
static inline int topk_above(float a, float b) { return a != a ? b == b : a > b; }

/* v at index i into the k largest so far (tv descending, filled of them): after every value it
 * is not above, so an earlier index stays first among equal values. */
static inline void topk_insert(float *tv, int64_t *ti, int64_t *filled, int64_t k, float v, int64_t i) {
    int64_t p = *filled < k ? (*filled)++ : k - 1;
    while (p > 0 && topk_above(v, tv[p - 1])) {
        tv[p] = tv[p - 1];
        ti[p] = ti[p - 1];
        p--;
    }
    tv[p] = v;
    ti[p] = i;
}

int auditor_topk_tail(const float *pre, int64_t N, int64_t D, int64_t k, const int64_t *slot, int64_t m,
                      const int64_t *place_slot, int64_t places, const float *w_dec, const float *b_dec,
                      const float *x, int64_t d_in, float scale, float *out) {
    float *tv_all = malloc((size_t)(N * k + m + 1 + d_in) * sizeof(float));
    int64_t *ti_all = malloc((size_t)(N * k) * sizeof(int64_t));
    if (!tv_all || !ti_all) {
        free(tv_all);
        free(ti_all);
        return -1;
    }
    float *slots = tv_all + N * k, *y = slots + m + 1;
    /* Each row's codes and picks; the W_dec rows its codes address are fetched from memory
     * (prefetched) while the next rows are ranked. */
    for (int64_t n = 0; n < N; n++) {
        const float *row = pre + n * D;
        float *tv = tv_all + n * k;
        int64_t *ti = ti_all + n * k;
        int64_t filled = 0, i = 0;
        for (; i < D; i++) {
            if (filled == k) break;
            topk_insert(tv, ti, &filled, k, row[i], i);
        }
        /* Eight at a time: most blocks hold nothing above the k-th largest so far (a NaN on
         * either side compares as above, and is then placed one by one). */
        for (; i + 8 <= D; i += 8) {
            int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + i), _mm256_set1_ps(tv[k - 1]), _CMP_NLE_UQ));
            while (mask) {
                const int b = __builtin_ctz(mask);
                mask &= mask - 1;
                if (topk_above(row[i + b], tv[k - 1])) topk_insert(tv, ti, &filled, k, row[i + b], i + b);
            }
        }
        for (; i < D; i++)
            if (topk_above(row[i], tv[k - 1])) topk_insert(tv, ti, &filled, k, row[i], i);
        for (int64_t j = 0; j < k; j++)
            if (tv[j] < 0.0f) tv[j] = 0.0f;  /* ReLU as torch's: NaN and -0.0 stay */
        for (int64_t s = 0; s <= m; s++) slots[s] = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            const int64_t s = slot[ti[j]];
            if (s < 0 || s > m) goto bad_slot;
            slots[s] = tv[j];
        }
        float *pk = out + n * places;
        for (int64_t p = 0; p < places; p++) {
            const int64_t s = place_slot[p];
            if (s < 0 || s > m) goto bad_slot;
            pk[p] = slots[s];
        }
        if (w_dec)
            for (int64_t j = 0; j < k; j++)
                for (int64_t d = 0; d < d_in; d += 16) _mm_prefetch((const char *)(w_dec + ti[j] * d_in + d), _MM_HINT_T0);
    }
    if (w_dec) {
        for (int64_t n = 0; n < N; n++) {
            const float *tv = tv_all + n * k;
            const int64_t *ti = ti_all + n * k;
            for (int64_t d = 0; d < d_in; d++) y[d] = 0.0f;
            for (int64_t j = 0; j < k; j++) {
                const float w = tv[j], *wr = w_dec + ti[j] * d_in;
                for (int64_t d = 0; d < d_in; d++) y[d] += w * wr[d];
            }
            /* In float32, as torch's norms: a row too small or too large for its squares
             * underflows or overflows as there. */
            const float *xr = x + n * d_in;
            float e2 = 0.0f, n2 = 0.0f;
            for (int64_t d = 0; d < d_in; d++) {
                const float diff = xr[d] - (y[d] + b_dec[d]) * scale;
                e2 += diff * diff;
                n2 += xr[d] * xr[d];
            }
            const float e = sqrtf(e2), nx = sqrtf(n2);
            out[N * places + n] = nx > 0.0f ? e / (nx > FLT_MIN ? nx : FLT_MIN) : e;
        }
    }
    free(tv_all);
    free(ti_all);
    return 0;
bad_slot:
    free(tv_all);
    free(ti_all);
    return -1;
}
