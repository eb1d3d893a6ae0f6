/* sampler.h: DDPM and DDIM sampling over any noise predictor.
 *
 * Legend: N samples in a batch, C, H, W image size, t timestep, s the next
 * timestep of the list (or "final").  Formulas: shared/DESIGN.md.
 */
#pragma once

#include <gio/gio.h>

#include "schedule.h"

G_BEGIN_DECLS

#define DF_SAMPLER_ERROR (df_sampler_error_quark ())
GQuark df_sampler_error_quark (void);

typedef enum {
  DF_SAMPLER_ERROR_INVALID,     /* a parameter out of range */
  DF_SAMPLER_ERROR_CANCELLED    /* unused: df_sample reports a cancel as
                                 * G_IO_ERROR_CANCELLED */
} DfSamplerError;

typedef enum { DF_SAMPLER_DDIM, DF_SAMPLER_DDPM } DfSamplerKind;
typedef enum { DF_VARIANCE_FIXED_SMALL, DF_VARIANCE_FIXED_LARGE } DfVariance;
typedef enum {
  DF_GUIDANCE_NONE,             /* the label, if any, goes straight to eps */
  DF_GUIDANCE_FREE,             /* eps_u + s (eps_c - eps_u) */
  DF_GUIDANCE_CLASSIFIER        /* s grad log p(y | x_t, t) */
} DfGuidance;

typedef struct {
  DfSamplerKind sampler;
  int           steps;          /* 1..T */
  double        eta;            /* DDIM only, >= 0 */
  DfSpacing     spacing;
  DfVariance    variance;       /* DDPM only */
  gboolean      clip_x0;        /* clip predicted x0 to [-1, 1] */
  gboolean      final_alpha_one;/* final step to ab = 1 (else ab_0) */
  guint64       seed;
  int           label;          /* class, or -1 */
  DfGuidance    guidance;
  double        scale;          /* guidance scale */
  /* Guidance only at noise levels sigma_t = sqrt ((1 - ab_t) / ab_t) in
   * (guide_lo, guide_hi] (Kynkaanniemi et al. 2024); elsewhere free
   * guidance is the conditional prediction whatever the scale (so scale 0,
   * unconditional, holds only inside) and classifier guidance adds
   * nothing.  0 and INFINITY: every step. */
  double        guide_lo, guide_hi;
} DfSampleParams;

/* The guidance interval the front ends (CLI, plug-in) give classifier-free
 * guidance unless told otherwise (and unless the scale is 0, which asks for
 * unconditional samples), as numbers and as the text of their help.
 * Chosen with diffuse eval on the shipped Fashion-MNIST model: at scale 3,
 * guiding every step keeps 96% of samples their class but narrows each
 * class to 37x the Frechet floor; guiding only here keeps the class and the
 * spread (weights/README.md has the sweep). */
#define DF_FREE_GUIDE_LO       0.28
#define DF_FREE_GUIDE_HI       3.0
#define DF_FREE_GUIDE_TEXT     "0.28,3"
/* Guidance scales the CLI and the plug-in take: 0 (unconditional) to this;
 * 1 is the conditional prediction, 3 the default. */
#define DF_GUIDE_SCALE_MAX     100.0

/* DDIM, 50 steps, eta 0, leading spacing, fixed_small, predicted x0 clipped
 * to [-1, 1] (images live there; diffusers' schedulers clip by default too:
 * without it an undertrained model's x0 at large t can run away), final ab 1,
 * seed 0, no label, no guidance, scale 1, guidance at every noise level. */
void df_sample_params_init (DfSampleParams *p);

/* eps[N,C,H,W] for x[N,C,H,W] at timestep t; labels[N] or NULL. */
typedef gboolean (*DfEpsFunc)  (gpointer user_data, const float *x, int n,
                                int t, const int *labels, float *eps,
                                GError **error);
/* grad[N,C,H,W] = d/dx sum_i log p(labels[i] | x_i, t). */
typedef gboolean (*DfGradFunc) (gpointer user_data, const float *x, int n,
                                int t, const int *labels, float *grad,
                                GError **error);
/* Called after each denoising step with the batch's predicted x0[N,C,H,W]
 * (clipped when clip_x0); step counts the steps done, 1..total. */
typedef void     (*DfProgressFunc) (gpointer user_data, int step, int total,
                                    const float *x0, int n);

typedef struct {
  int        channels, height, width;
  int        num_classes;       /* 0: unconditional */
  int        uncond_label;      /* label meaning "no class" for free guidance */
  DfEpsFunc  eps;
  gpointer   eps_data;
  DfGradFunc class_grad;        /* classifier guidance only */
  gpointer   grad_data;
} DfDenoiser;

/* Check p against the schedule and the denoiser. */
gboolean df_sample_params_check (const DfSampleParams *p, const DfSchedule *s,
                                 const DfDenoiser *d, GError **error);

/* How many of p's steps guidance applies at: those whose noise level is
 * in p's guidance interval (all of them for the default one), or -1 if
 * p's steps or spacing do not fit s.  The front ends use it to refuse a
 * guidance option that would guide no step. */
int      df_sample_guided_steps  (const DfSchedule *s,
                                  const DfSampleParams *p);

/* The initial noise of sample index, as a sampler would draw it. */
void     df_sample_initial_noise (guint64 seed, guint64 index, int size,
                                  float *out);

/* Denoise n samples with indices first..first+n-1 (noise keyed by p->seed
 * and the index) into out[N,C,H,W].  x_T: NULL draws the initial noise;
 * otherwise it is used as given.  Step k draws its noise from stream
 * (seed, first + i, k).  Free guidance calls d->eps once a step on 2n
 * samples (labels first, then uncond_label), or on n only when scale is
 * exactly 1 (conditional) or 0 (unconditional), and at steps outside the
 * guidance interval.  Cancellation is checked
 * before every step and reported as G_IO_ERROR_CANCELLED. */
gboolean df_sample (const DfSchedule *s, const DfDenoiser *d,
                    const DfSampleParams *p, guint64 first, int n,
                    const float *x_T, float *out,
                    DfProgressFunc progress, gpointer progress_data,
                    GCancellable *cancellable, GError **error);

/* Spherical interpolation of two noises of size n at fraction a in [0, 1];
 * exactly x0 at a = 0 and x1 at a = 1, linear when nearly parallel. */
void     df_slerp (const float *x0, const float *x1, gsize n, double a,
                   float *out);

G_END_DECLS
