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
#include <stdint.h>

#define NR 3        /* output columns per block */
#define MR 4        /* input rows per micro-kernel call */
#define AHEAD 2     /* blocks prefetched ahead */

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Rows m..m+rows-1 (rows is MR or 1) times weight rows n..n+cols-1 (cols <= NR). With
 * do_prefetch, each step also prefetches the matching part of the NR weight rows at prefetch. */
static inline __attribute__((always_inline)) void block(const float *x, const float *w, const float *bias, float *y, int64_t N, int64_t K,
                         int64_t m, int rows, int64_t n, int cols, int do_prefetch, const float *prefetch) {
    const float *xr[MR], *wr[NR];
    __m256 acc[MR][NR];
    for (int i = 0; i < MR; i++) xr[i] = x + (m + (i < rows ? i : 0)) * K;
    for (int j = 0; j < NR; j++) wr[j] = w + (n + (j < cols ? j : 0)) * K;
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
    /* Constant bounds, fully unrolled: the accumulators stay in registers. */
#pragma GCC unroll 4
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 3
        for (int j = 0; j < NR; j++) {
            if (i >= rows || j >= cols) continue;
            float s = hsum(acc[i][j]);
            for (int64_t k = K8; k < K; k++) s += xr[i][k] * wr[j][k];
            y[(m + i) * N + n + j] = bias ? s + bias[n + j] : s;
        }
}

void auditor_skinny_linear(const float *x, const float *w, const float *bias, float *y, int64_t M, int64_t N,
                           int64_t K, int threads) {
    if (M <= 0 || N <= 0) return;
    const int64_t blocks = (N + NR - 1) / NR;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n = b * NR;
        const int cols = N - n < NR ? (int)(N - n) : NR;
        const int64_t ahead = n + AHEAD * NR;
        const float *prefetch = w + (ahead + NR <= N ? ahead : n) * K;
        /* The first call prefetches (each call site is specialized: rows and prefetch are constants there). */
        int64_t m = M >= MR ? MR : 1;
        if (m == MR)
            block(x, w, bias, y, N, K, 0, MR, n, cols, 1, prefetch);
        else
            block(x, w, bias, y, N, K, 0, 1, n, cols, 1, prefetch);
        for (; m + MR <= M; m += MR) block(x, w, bias, y, N, K, m, MR, n, cols, 0, prefetch);
        for (; m < M; m++) block(x, w, bias, y, N, K, m, 1, n, cols, 0, prefetch);
    }
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
