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
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

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

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    if (!next_sgemm || !next_sgemv) {
        fprintf(stderr, "gemv_forward: no BLAS with cblas_sgemm/cblas_sgemv is loaded after it; "
                        "list the BLAS library after this one in LD_PRELOAD\n");
        abort();
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
