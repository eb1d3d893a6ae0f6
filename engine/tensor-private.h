/* tensor-private.h: how operations (tensor.c, ops.c) record themselves on a
 * DfGraph.  Not part of the engine's API.
 */
#pragma once

#include "tensor.h"

G_BEGIN_DECLS

typedef struct _DfRecord DfRecord;

typedef void (*DfBackwardFunc) (DfGraph *g, DfRecord *r);

#define DF_RECORD_INPUTS 4

/* One recorded operation: its output, its inputs (tensors or parameters)
 * and whatever small state its backward needs. */
struct _DfRecord {
  DfBackwardFunc  backward;
  DfTensor       *out;
  DfTensor       *in[DF_RECORD_INPUTS];
  void           *saved;       /* graph-recycled buffer, or NULL */
  int             iarg[4];
  float           farg[2];
};

/* TRUE when g records and one of the (possibly NULL) tensors needs a grad. */
gboolean   df_graph_wants       (DfGraph *g, DfTensor *a, DfTensor *b,
                                 DfTensor *c, DfTensor *d);
/* Push a record for out (which gets requires_grad); the pointer is valid
 * until the next df_graph_push. */
DfRecord  *df_graph_push        (DfGraph *g, DfBackwardFunc backward,
                                 DfTensor *out);
/* A buffer kept until the next reset, recycled in the same sequence. */
void      *df_graph_saved       (DfGraph *g, gsize bytes);
/* Scratch floats, valid until the next df_graph_workspace call. */
float     *df_graph_workspace   (DfGraph *g, gsize n_floats);

/* The grad of t if it takes one (zeroed on first use this pass), or NULL. */
static inline float *
df_grad_or_null (DfTensor *t)
{
  return t != NULL && t->requires_grad ? df_tensor_grad (t) : NULL;
}

/* OpenMP only pays off past some work; results never depend on it. */
#define DF_PAR_MIN 8192

G_END_DECLS
