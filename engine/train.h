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
                                    rows, or NULL: see df_trainer_run */
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
 * moments and the step.  A checkpoint of another run is an error
 * (DF_TRAIN_ERROR_CHECKPOINT) naming the option, as the CLI spells it, with
 * the checkpoint's value and this run's: the task, the network (its config,
 * sample_size included), the noise schedule, the data (image count and class
 * names), the seed, the batch, the flips and p_uncond.  An item the
 * checkpoint does not hold (older files) is not checked. */
gboolean   df_trainer_resume    (DfTrainer *t, gboolean *resumed, GError **error);

/* An option a resumed run changed, one a run may change (the learning rate
 * and its schedule, warm-up, steps, weight decay, Adam, EMA, clipping,
 * checkpoint interval, threads).  Values are as a user would type them. */
typedef struct {
  const char *option;        /* "--lr", "--steps", ... */
  char       *checkpoint;    /* the checkpoint's value: "0.001" */
  char       *value;         /* this run's: "0.0005" */
} DfTrainChange;

/* The changes found by the last successful df_trainer_resume (none when it
 * did not resume); owned by t. */
const DfTrainChange *df_trainer_changes (DfTrainer *t, int *n_changes);
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
 * at the end, a CSV row and a progress call per step.  The CSV keeps its
 * rows up to the current step and gets the new ones after them: a resumed
 * run replaces the rows past its checkpoint's step, a fresh run (step 0)
 * starts the log again.  Cancelling saves a checkpoint and returns
 * DF_TRAIN_ERROR_CANCELLED. */
gboolean   df_trainer_run       (DfTrainer *t, DfTrainProgressFunc progress,
                                 gpointer data, GCancellable *cancellable,
                                 GError **error);

/* Bytes a training step of a network with cfg (a classifier when
 * classifier) needs at batch images: its weights, gradients, Adam moments,
 * EMA and a spare copy (6 floats a parameter), the activations and their
 * gradients of one forward and backward pass, the convolutions' scratch and
 * the batch buffers, rounded up; the data set is not included.  Computed
 * from the config alone, so a network too big to allocate can be refused
 * before it is built; *n_params (if not NULL) gets its parameter count,
 * df_unet_param_count's value. */
double     df_train_memory_estimate (const DfUNetConfig *cfg,
                                     gboolean classifier, int batch,
                                     double *n_params);

/* Plot a log written by df_trainer_run (smoothed loss against step, log y,
 * raw loss faint behind it) as a PNG. */
gboolean   df_train_plot_loss   (const char *csv, const char *png,
                                 GError **error);

G_END_DECLS
