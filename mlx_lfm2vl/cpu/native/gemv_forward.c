/* One-row float32 matmuls as BLAS gemv calls, for MLX's CPU backend on Linux.
 *
 * MLX computes every float32 matmul with cblas_sgemm, including the one-row products of a decode
 * step (1 x K times K x N). OpenBLAS before 0.3.27 (Debian 12 ships 0.3.21) runs those through its
 * blocked gemm, which repacks the whole weight matrix on every call: measured on a 2-core EPYC,
 * 5-10 GB/s of weights read, against 20-25 GB/s for the same product as cblas_sgemv. Newer
 * OpenBLAS builds forward such calls themselves (GEMM_GEMV_FORWARD); this library does the same
 * for older ones.
 *
 * Preload it in front of the real BLAS (LD_PRELOAD="this.so libopenblas.so.0"): it defines
 * cblas_sgemm, sends row-major products with one row or one column to the next library's
 * cblas_sgemv, and passes every other call through unchanged. Only the order of the additions
 * inside one dot product changes (float32 rounding, ~1e-7 relative).
 *
 * It also computes one-row products with bfloat16 weights in float32 arithmetic (see
 * bf16_product below): the published weights are bf16, and a decode step bound by reading them
 * reads half the bytes that way, with the same products as on the weights upcast to float32.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

typedef void (*sgemm_fn)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                         const float *a, int lda, const float *b, int ldb, float beta, float *c,
                         int ldc);
typedef void (*sgemv_fn)(int order, int trans, int rows, int cols, float alpha, const float *a,
                         int lda, const float *x, int inc_x, float beta, float *y, int inc_y);

static sgemm_fn next_sgemm;
static sgemv_fn next_sgemv;

/* Resolved once at load time, before any MLX thread can call in. */
__attribute__((constructor)) static void find_next_blas(void) {
    next_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
    next_sgemv = (sgemv_fn)dlsym(RTLD_NEXT, "cblas_sgemv");
}

/* ------------------------------------------------------------ bf16 weights, float32 arithmetic
 *
 * MLX has no CPU kernel that reads bf16 weights and multiplies in float32 (its bf16 matmul runs
 * in ~7 GFLOP/s reference code, and a mixed-dtype matmul first converts the whole weight at
 * ~3 ns per element), and an extension of MLX would need its Python bindings built against
 * MLX's own. So the port asks for this product through an ordinary float32 matmul that MLX
 * hands to cblas_sgemm, marked by an alpha no real call uses (BF16_TAG), with operands that are
 * the bf16 data reinterpreted (cpu/ops.py, bf16_matmul):
 *   a: the float32 input, m rows of K values, viewed as 2m x K/2, row-major;
 *   b: the bf16 weight (N x K) viewed as float32 N x K/2, transposed;
 *   c: 2m x N; rows 0..m-1 receive x . W^T, the others are left as they were (never read).
 * Up to SMALL_M rows (a decode step, of one request or of a batch of them) run the kernels
 * below, the weight rows split between the calling thread and a helper thread: two cores read
 * memory ~40% faster than one here. More rows (a prefill) are bound by arithmetic: panels of the
 * weight are widened to float32 in a buffer that stays in cache and multiplied by the next
 * library's sgemm.
 * Python only sends the tag after finding gemv_forward_bf16_tag in the process, so the tag never
 * reaches a BLAS that would multiply the bit patterns. A tagged call in any other layout aborts.
 */

#define BF16_TAG (-0x1.5bf16p-60f)

/* The tag, or 0 where only the portable loops run: those were never measured against sgemv, so
 * Python then upcasts the weights as before. Set at load time (pick_bf16_kernel). */
static float offered_tag;

float gemv_forward_bf16_tag(void) { return next_sgemm && next_sgemv ? offered_tag : 0.0f; }

/* The file name of the BLAS that calls are forwarded to ("" if none), for `--verbose`. */
const char *gemv_forward_next_blas(void) {
    Dl_info info;
    if (next_sgemm && dladdr((void *)next_sgemm, &info) && info.dli_fname) return info.dli_fname;
    return "";
}

static inline float bf16_to_float(uint16_t bits) {
    uint32_t widened = (uint32_t)bits << 16; /* exact: bf16 is float32's upper half */
    float value;
    memcpy(&value, &widened, sizeof value);
    return value;
}

/* y[r] = dot(w row r, x) for rows [r0, r1); w rows are `stride` bf16 values apart. Four rows
 * share each load of x; eight partial sums per row, added pairwise at the end. */
static void bf16_rows_portable(const uint16_t *w, size_t stride, int cols, const float *x,
                               float *y, int r0, int r1) {
    for (int r = r0; r < r1; r++) {
        const uint16_t *row = w + (size_t)r * stride;
        float part[8] = {0};
        int c = 0;
        for (; c + 8 <= cols; c += 8)
            for (int j = 0; j < 8; j++) part[j] += bf16_to_float(row[c + j]) * x[c + j];
        for (; c < cols; c++) part[0] += bf16_to_float(row[c]) * x[c];
        y[r] = ((part[0] + part[4]) + (part[2] + part[6])) + ((part[1] + part[5]) + (part[3] + part[7]));
    }
}

#if defined(__x86_64__)
#include <immintrin.h>

__attribute__((target("avx2,fma"))) static inline __m256 bf16x8(const uint16_t *p) {
    __m128i half = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

__attribute__((target("avx2,fma"))) static float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) static void bf16_rows_avx2(const uint16_t *w, size_t stride,
                                                               int cols, const float *x, float *y,
                                                               int r0, int r1) {
    int r = r0, body = cols & ~7;
    for (; r + 4 <= r1; r += 4) {
        const uint16_t *w0 = w + (size_t)r * stride, *w1 = w0 + stride, *w2 = w1 + stride,
                       *w3 = w2 + stride;
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (int c = 0; c < body; c += 8) {
            __m256 xv = _mm256_loadu_ps(x + c);
            s0 = _mm256_fmadd_ps(bf16x8(w0 + c), xv, s0);
            s1 = _mm256_fmadd_ps(bf16x8(w1 + c), xv, s1);
            s2 = _mm256_fmadd_ps(bf16x8(w2 + c), xv, s2);
            s3 = _mm256_fmadd_ps(bf16x8(w3 + c), xv, s3);
        }
        float t[4] = {sum8(s0), sum8(s1), sum8(s2), sum8(s3)};
        for (int c = body; c < cols; c++)
            for (int j = 0; j < 4; j++) t[j] += bf16_to_float(w0[(size_t)j * stride + c]) * x[c];
        memcpy(y + r, t, sizeof t);
    }
    if (r < r1) bf16_rows_portable(w, stride, cols, x, y, r, r1);
}

/* bf16_rows_avx2 for m input rows at once (row i at x + i * ldx, its outputs at y + i * ldy):
 * each block of four weight rows is read from memory once for all of them, two input rows at a
 * time (16 accumulators would not fit in the 16 vector registers). Every (weight row, input row)
 * pair is summed exactly as bf16_rows_avx2 sums it for one input row, and the rows past the last
 * block of four go to the same portable loop: an input row's products are bitwise the same
 * alone or beside others, so a request's answer does not depend on its batch. */
__attribute__((target("avx2,fma"))) static void bf16_block_avx2(const uint16_t *w, size_t stride,
                                                                int cols, const float *x,
                                                                size_t ldx, int m, float *y,
                                                                size_t ldy, int r0, int r1) {
    int r = r0, body = cols & ~7;
    for (; r + 4 <= r1; r += 4) {
        const uint16_t *w0 = w + (size_t)r * stride, *w1 = w0 + stride, *w2 = w1 + stride,
                       *w3 = w2 + stride;
        /* The next block's rows, fetched while this block is multiplied: the hardware
         * prefetcher runs only a few lines ahead, so the later passes over a block (from cache)
         * would otherwise leave memory idle. */
        const uint16_t *next = r + 8 <= r1 ? w3 + stride : NULL;
        int i = 0;
        for (; i + 2 <= m; i += 2) {
            const float *xa = x + (size_t)i * ldx, *xb = xa + ldx;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            for (int c = 0; c < body; c += 8) {
                if (next && i == 0 && (c & 31) == 0) {
                    _mm_prefetch((const char *)(next + c), _MM_HINT_T0);
                    _mm_prefetch((const char *)(next + stride + c), _MM_HINT_T0);
                    _mm_prefetch((const char *)(next + 2 * stride + c), _MM_HINT_T0);
                    _mm_prefetch((const char *)(next + 3 * stride + c), _MM_HINT_T0);
                }
                __m256 v0 = bf16x8(w0 + c), v1 = bf16x8(w1 + c), v2 = bf16x8(w2 + c),
                       v3 = bf16x8(w3 + c);
                __m256 xv = _mm256_loadu_ps(xa + c);
                a0 = _mm256_fmadd_ps(v0, xv, a0);
                a1 = _mm256_fmadd_ps(v1, xv, a1);
                a2 = _mm256_fmadd_ps(v2, xv, a2);
                a3 = _mm256_fmadd_ps(v3, xv, a3);
                xv = _mm256_loadu_ps(xb + c);
                b0 = _mm256_fmadd_ps(v0, xv, b0);
                b1 = _mm256_fmadd_ps(v1, xv, b1);
                b2 = _mm256_fmadd_ps(v2, xv, b2);
                b3 = _mm256_fmadd_ps(v3, xv, b3);
            }
            float ta[4] = {sum8(a0), sum8(a1), sum8(a2), sum8(a3)};
            float tb[4] = {sum8(b0), sum8(b1), sum8(b2), sum8(b3)};
            for (int c = body; c < cols; c++)
                for (int j = 0; j < 4; j++) {
                    ta[j] += bf16_to_float(w0[(size_t)j * stride + c]) * xa[c];
                    tb[j] += bf16_to_float(w0[(size_t)j * stride + c]) * xb[c];
                }
            memcpy(y + (size_t)i * ldy + r, ta, sizeof ta);
            memcpy(y + (size_t)(i + 1) * ldy + r, tb, sizeof tb);
        }
        if (i < m) bf16_rows_avx2(w, stride, cols, x + (size_t)i * ldx, y + (size_t)i * ldy, r, r + 4);
    }
    if (r < r1)
        for (int i = 0; i < m; i++)
            bf16_rows_portable(w, stride, cols, x + (size_t)i * ldx, y + (size_t)i * ldy, r, r1);
}
#endif

static void bf16_block_portable(const uint16_t *w, size_t stride, int cols, const float *x,
                                size_t ldx, int m, float *y, size_t ldy, int r0, int r1) {
    for (int i = 0; i < m; i++)
        bf16_rows_portable(w, stride, cols, x + (size_t)i * ldx, y + (size_t)i * ldy, r0, r1);
}

typedef void (*block_fn)(const uint16_t *, size_t, int, const float *, size_t, int, float *,
                         size_t, int, int);
static block_fn bf16_block = bf16_block_portable;

/* Input rows up to which bf16_block is faster than widening panels for sgemm. Measured on the
 * 450M LM's 65 products (bf16 weights from memory, 2-core EPYC): 33 rows 215 vs 310 ms, 48 rows
 * 311 vs 323 ms, 64 rows 406 vs 363 ms. */
enum { SMALL_M = 48 };

/* The helper thread's share of a product. One product at a time (`submit` is held). */
static struct {
    const uint16_t *w;
    size_t stride, ldx, ldy;
    int cols, m;
    const float *x;
    float *y;
    int r0, r1;
} share;
static atomic_uint posted, finished;
static pthread_mutex_t submit = PTHREAD_MUTEX_INITIALIZER, wake_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static int helper_started;

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* Spins for up to 200 us after each share (a decode step's products come microseconds apart,
 * and waking a sleeping thread costs more than that), then sleeps until the next one. */
static void *helper(void *unused) {
    (void)unused;
    unsigned seen = 0;
    for (;;) {
        double until = seconds() + 200e-6;
        while (atomic_load_explicit(&posted, memory_order_acquire) == seen && seconds() < until)
            ;
        pthread_mutex_lock(&wake_lock);
        while (atomic_load_explicit(&posted, memory_order_acquire) == seen)
            pthread_cond_wait(&wake, &wake_lock);
        pthread_mutex_unlock(&wake_lock);
        seen = atomic_load_explicit(&posted, memory_order_acquire);
        bf16_block(share.w, share.stride, share.cols, share.x, share.ldx, share.m, share.y,
                   share.ldy, share.r0, share.r1);
        atomic_store_explicit(&finished, seen, memory_order_release);
    }
    return NULL;
}

/* y = x . W^T for m input rows (m <= SMALL_M), the weight rows split between this thread and
 * the helper. */
static void bf16_product(const uint16_t *w, size_t stride, int rows, int cols, const float *x,
                         size_t ldx, int m, float *y, size_t ldy) {
    /* Below ~64k weights the hand-off costs more than the second core saves. */
    int split = rows >= 64 && (size_t)rows * cols >= 65536 && pthread_mutex_trylock(&submit) == 0;
    if (!split) {
        bf16_block(w, stride, cols, x, ldx, m, y, ldy, 0, rows);
        return;
    }
    if (!helper_started) {
        pthread_t thread;
        helper_started = 1;
        if (pthread_create(&thread, NULL, helper, NULL) != 0) {
            helper_started = 0;
            pthread_mutex_unlock(&submit);
            bf16_block(w, stride, cols, x, ldx, m, y, ldy, 0, rows);
            return;
        }
        pthread_detach(thread);
    }
    int half = (rows / 2 + 3) & ~3;
    share.w = w, share.stride = stride, share.cols = cols, share.x = x, share.ldx = ldx;
    share.m = m, share.y = y, share.ldy = ldy, share.r0 = half, share.r1 = rows;
    pthread_mutex_lock(&wake_lock);
    unsigned ticket = atomic_fetch_add_explicit(&posted, 1, memory_order_release) + 1;
    pthread_cond_signal(&wake);
    pthread_mutex_unlock(&wake_lock);
    bf16_block(w, stride, cols, x, ldx, m, y, ldy, 0, half);
    while (atomic_load_explicit(&finished, memory_order_acquire) != ticket)
        ;
    pthread_mutex_unlock(&submit);
}

/* rows x cols bf16 (rows `stride` apart) -> rows x cols float32, contiguous. */
static void widen_rows_portable(const uint16_t *w, size_t stride, int rows, int cols, float *out) {
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) out[(size_t)r * cols + c] = bf16_to_float(w[r * stride + c]);
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) static void widen_rows_avx2(const uint16_t *w, size_t stride,
                                                                int rows, int cols, float *out) {
    for (int r = 0; r < rows; r++) {
        const uint16_t *row = w + (size_t)r * stride;
        float *dest = out + (size_t)r * cols;
        int c = 0;
        for (; c + 8 <= cols; c += 8) _mm256_storeu_ps(dest + c, bf16x8(row + c));
        for (; c < cols; c++) dest[c] = bf16_to_float(row[c]);
    }
}
#endif

typedef void (*widen_fn)(const uint16_t *, size_t, int, int, float *);
static widen_fn widen_rows = widen_rows_portable;

/* Weight rows widened per sgemm call: 8 MiB of float32, which stays in the last-level cache. */
enum { PANEL_BYTES = 8 << 20 };

static void bf16_matmul(const uint16_t *w, size_t stride, int m, int n, int cols, const float *x,
                        float *y, int ldy) {
    int panel = PANEL_BYTES / (cols * (int)sizeof(float));
    if (panel < 16) panel = 16;
    if (panel > n) panel = n;
    float *widened = malloc((size_t)panel * cols * sizeof(float));
    if (!widened) {
        fprintf(stderr, "gemv_forward: out of memory for a %d x %d float32 panel\n", panel, cols);
        abort();
    }
    for (int n0 = 0; n0 < n; n0 += panel) {
        int rows = n - n0 < panel ? n - n0 : panel;
        widen_rows(w + (size_t)n0 * stride, stride, rows, cols, widened);
        next_sgemm(ROW_MAJOR, NO_TRANS, TRANS, m, rows, cols, 1.0f, x, cols, widened, cols, 0.0f,
                   y + n0, ldy);
    }
    free(widened);
}

static void tagged_call(int order, int trans_a, int trans_b, int m, int n, int k, const float *a,
                        int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    /* MLX picks the transpose flags from the strides, which say nothing when a dimension is 1:
     * a one-float-wide x or weight row, or a single weight row, may come either way. */
    int a_contiguous = (trans_a == NO_TRANS && lda == k) || k == 1;
    size_t row_stride = 0; /* floats from one weight row to the next */
    if (trans_b == TRANS && ldb >= k)
        row_stride = ldb;
    else if (trans_b == NO_TRANS && k == 1)
        row_stride = 1;
    else if (trans_b == NO_TRANS && n == 1)
        row_stride = k;
    if (order != ROW_MAJOR || m < 2 || m % 2 || !a_contiguous || !row_stride || beta != 0.0f ||
        ldc < n) {
        fprintf(stderr, "gemv_forward: a bf16 product call with an unexpected layout (m=%d n=%d "
                        "k=%d lda=%d ldb=%d trans %d,%d); please report this as a bug of "
                        "mlx_lfm2vl\n",
                m, n, k, lda, ldb, trans_a, trans_b);
        abort();
    }
    if (m / 2 <= SMALL_M)
        bf16_product((const uint16_t *)b, 2 * row_stride, n, 2 * k, a, 2 * (size_t)k, m / 2, c,
                     ldc);
    else
        bf16_matmul((const uint16_t *)b, 2 * row_stride, m / 2, n, 2 * k, a, c, ldc);
}

#if defined(__x86_64__)
__attribute__((constructor)) static void pick_bf16_kernel(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        bf16_block = bf16_block_avx2;
        widen_rows = widen_rows_avx2;
        offered_tag = BF16_TAG;
    }
}
#endif

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    if (!next_sgemm || !next_sgemv) {
        fprintf(stderr, "gemv_forward: no BLAS with cblas_sgemm/cblas_sgemv is loaded after it; "
                        "list the BLAS library after this one in LD_PRELOAD\n");
        abort();
    }
    if (alpha == BF16_TAG) {
        tagged_call(order, trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc);
        return;
    }
    if (order == ROW_MAJOR && k > 0 && m == 1) {
        /* c (1 x n) = row (1 x k) . op(b) (k x n), i.e. c = op(b)^T row. The row is a's only row,
         * or its only column when a is stored transposed (k x 1, one element per lda). */
        int inc_row = trans_a == NO_TRANS ? 1 : lda;
        if (trans_b == TRANS) /* b stored n x k */
            next_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, inc_row, beta, c, 1);
        else /* b stored k x n */
            next_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, inc_row, beta, c, 1);
        return;
    }
    if (order == ROW_MAJOR && k > 0 && n == 1) {
        /* c (m x 1, one element per ldc) = op(a) (m x k) . column (k x 1). */
        int inc_column = trans_b == NO_TRANS ? ldb : 1;
        if (trans_a == NO_TRANS) /* a stored m x k */
            next_sgemv(ROW_MAJOR, NO_TRANS, m, k, alpha, a, lda, b, inc_column, beta, c, ldc);
        else /* a stored k x m */
            next_sgemv(ROW_MAJOR, TRANS, k, m, alpha, a, lda, b, inc_column, beta, c, ldc);
        return;
    }
    next_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
