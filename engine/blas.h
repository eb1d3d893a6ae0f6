/* blas.h: OpenBLAS, opened at run time with the best correct kernel.
 *
 * OpenBLAS picks its kernel in a constructor when the library is loaded, and
 * 0.3.21 misreads some CPUs (virtual machines, newer Xeons and EPYCs) as an
 * old core such as Prescott.  The engine therefore opens libopenblas itself:
 * unless the user set OPENBLAS_CORETYPE, it reads the CPU's features (cpuid,
 * and xgetbv for the OS's register state) and, when the core OpenBLAS chose is
 * weaker than the CPU supports, reopens it with the matching core type.
 */
#pragma once

#include <glib.h>

G_BEGIN_DECLS

typedef enum { DF_NO_TRANS = 111, DF_TRANS = 112 } DfTranspose;

/* Opens OpenBLAS once per process (thread-safe).  Every other df_blas_ call
 * does this itself; call it early to get the error. */
gboolean     df_blas_init             (GError **error);

/* The kernel OpenBLAS runs ("Haswell", "SkylakeX", ...), how it was chosen
 * ("detected by OpenBLAS", "set by OPENBLAS_CORETYPE", "chosen by diffuse
 * from cpuid: OpenBLAS picked Prescott"), and the best core type the CPU
 * supports according to cpuid. */
const char  *df_blas_corename         (void);
const char  *df_blas_choice           (void);
const char  *df_blas_cpu_coretype     (void);

/* The CPU features that decide the core type: cpuid leaves 1 and 7, and
 * xgetbv for the register state the operating system saves. */
typedef struct {
  gboolean avx, fma, avx2;
  gboolean avx512f, avx512bw, avx512dq, avx512vl, avx512cd;
  gboolean os_ymm;              /* XCR0 saves XMM and YMM */
  gboolean os_zmm;              /* XCR0 saves opmask and all of ZMM */
} DfCpuFeatures;

/* This CPU's features (all FALSE off x86). */
void         df_cpu_features_read     (DfCpuFeatures *f);
/* The best OpenBLAS 0.3.21 core type f supports: "SkylakeX" (AVX512 F, BW,
 * DQ, VL, CD), "Haswell" (AVX2 and FMA), "Sandybridge" (AVX), or NULL. */
const char  *df_cpu_best_coretype     (const DfCpuFeatures *f);
/* The pure decision: the core type to force given the CPU's features,
 * the core OpenBLAS chose by itself and the user's OPENBLAS_CORETYPE (NULL
 * when unset).  NULL keeps OpenBLAS's choice: the user set one, the name is
 * not one diffuse knows, or it is already as strong as the CPU allows (Zen
 * counts as Haswell-level, Cooperlake and SapphireRapids as SkylakeX). */
const char  *df_blas_decide_coretype  (const DfCpuFeatures *f,
                                       const char *openblas_corename,
                                       const char *user_coretype);

void         df_blas_set_threads      (int n);
int          df_blas_get_threads      (void);

/* Row-major C = alpha op(A) op(B) + beta C; A is M x K after op, B K x N. */
void         df_sgemm                 (DfTranspose ta, DfTranspose tb,
                                       int M, int N, int K, float alpha,
                                       const float *A, int lda,
                                       const float *B, int ldb,
                                       float beta, float *C, int ldc);

/* One df_sgemm call's shape, as recorded by df_blas_trace(). */
typedef struct {
  DfTranspose ta, tb;
  int         M, N, K;
} DfGemmCall;

/* With calls non-NULL, append every later df_sgemm call's shape to it
 * (from any thread; the order between threads is unspecified) until
 * df_blas_trace (NULL).  For benchmarks: replaying the shapes alone gives
 * the GEMM-only time of a pass. */
void         df_blas_trace            (GArray *calls);

G_END_DECLS
