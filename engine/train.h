/* train.h: training a UNet on L_simple or a noisy classifier on
 * cross-entropy, with AdamW, EMA and atomic checkpoints that resume exactly.
 */
#pragma once

#include <gio/gio.h>

#include "dataset.h"
#include "model.h"

G_BEGIN_DECLS

#define DF_TRAIN_ERROR (df_train_error_quark ())
GQuark df_train_error_quark (void);

typedef enum {
  DF_TRAIN_ERROR_INVALID,
  DF_TRAIN_ERROR_CHECKPOINT,
  DF_TRAIN_ERROR_CANCELLED
} DfTrainError;

typedef enum { DF_LR_CONSTANT, DF_LR_COSINE } DfLrSchedule;

typedef struct {
  int          steps;            /* total optimiser steps */
  int          batch;
  double       lr;
  int          warmup;           /* linear warm-up steps */
  DfLrSchedule lr_schedule;      /* after warm-up */
  double       weight_decay;     /* AdamW, decoupled */
  double       beta1, beta2, adam_eps;
  double       ema_decay;
  double       grad_clip;        /* global L2 norm; 0: off */
  double       p_uncond;         /* label dropped to the uncond class */
  gboolean     hflip;
  guint64      seed;
  const char  *checkpoint;       /* path, or NULL */
  double       checkpoint_minutes;
  gboolean     resume;           /* continue from checkpoint if it exists */
  const char  *log_csv;          /* step,loss,smoothed_loss,lr,img_per_s
                                    appended; or NULL */
  const char  *output;           /* EMA weights, at checkpoints and the end */
} DfTrainOptions;

/* 10000 steps, batch 64, lr 2e-4, 500 warm-up steps then cosine, no weight
 * decay, Adam (0.9, 0.999, 1e-8), EMA 0.9999 (with the warm-up
 * min(decay, (1 + step) / (10 + step))), clip 1, p_uncond 0.1, no flips,
 * seed 0, no files, checkpoints every 10 minutes. */
void df_train_options_init (DfTrainOptions *o);

typedef struct {
  int     step, steps;
  double  loss, smoothed_loss;
  double  img_per_s, eta_seconds, lr;
} DfTrainProgress;

typedef void (*DfTrainProgressFunc) (gpointer user_data,
                                     const DfTrainProgress *p);

typedef struct _DfTrainer DfTrainer;

/* The model (UNet or classifier) is trained in place from its current
 * weights (initialise them first with df_unet_init); its weights become the
 * EMA weights when df_trainer_run ends.  data must outlive the trainer and
 * fit the model: same size and channels, and for a class-conditional UNet or
 * a classifier the same number of classes.  Sample i of step s draws its
 * image, flip, timestep and label drop from df_rng_u64 and its noise from
 * df_rng_normal, keyed by (o->seed, i, s): a run is reproducible, and a
 * resumed run continues bit for bit. */
DfTrainer *df_trainer_new       (DfModel *m, const DfDataset *data,
                                 const DfTrainOptions *o, GError **error);
void       df_trainer_free      (DfTrainer *t);
/* Load the checkpoint if o->resume and it exists: weights, EMA, Adam's
 * moments and the step. */
gboolean   df_trainer_resume    (DfTrainer *t, gboolean *resumed, GError **error);
int        df_trainer_step_index(DfTrainer *t);
/* One optimiser step; returns the batch loss in *loss. */
gboolean   df_trainer_step      (DfTrainer *t, double *loss, GError **error);
/* Write o->checkpoint (atomically; weights, "ema.", "adam_m.", "adam_v."
 * tensors, model metadata so df_model_load reads it, "train.*" metadata) and
 * o->output (the EMA weights, with df_model_save); either may be NULL. */
gboolean   df_trainer_save_checkpoint (DfTrainer *t, GError **error);
/* Copy the EMA weights into the model. */
void       df_trainer_apply_ema (DfTrainer *t);
/* Steps until o->steps, with checkpoints every o->checkpoint_minutes and
 * at the end, a CSV row and a progress call per step.  The CSV is appended
 * to after dropping its rows past the current step (a resumed run redoes
 * them; a fresh run starts the log again).  Cancelling saves a checkpoint
 * and returns DF_TRAIN_ERROR_CANCELLED. */
gboolean   df_trainer_run       (DfTrainer *t, DfTrainProgressFunc progress,
                                 gpointer data, GCancellable *cancellable,
                                 GError **error);

/* Plot a log written by df_trainer_run (smoothed loss against step, log y,
 * raw loss faint behind it) as a PNG. */
gboolean   df_train_plot_loss   (const char *csv, const char *png,
                                 GError **error);

G_END_DECLS
