/* model.h: a model file (UNet or classifier, its schedule and class names),
 * and the jobs the front ends run: generate, interpolate, eps.
 *
 * Engine files are safetensors whose __metadata__ holds:
 *   "format": "diffuse", "format_version": "1",
 *   "kind": "unet" | "classifier",
 *   "config": diffusers' UNet2DModel config as JSON (+ "classifier_classes"),
 *   "schedule": {"beta_schedule", "num_train_timesteps", "beta_start",
 *                "beta_end", "prediction_type": "epsilon"} as JSON,
 *   "class_names": JSON array of strings, "uncond_class": index or -1.
 * A diffusers folder (config.json + diffusion_pytorch_model.safetensors,
 * scheduler settings from ../scheduler/scheduler_config.json when present)
 * loads as well.
 */
#pragma once

#include <gio/gio.h>

#include "sampler.h"
#include "schedule.h"
#include "unet.h"

G_BEGIN_DECLS

#define DF_MODEL_ERROR (df_model_error_quark ())
GQuark df_model_error_quark (void);

typedef enum {
  DF_MODEL_ERROR_FORMAT,     /* not a model file, or an unsupported one */
  DF_MODEL_ERROR_INVALID     /* bad argument from the user */
} DfModelError;

typedef struct _DfModel DfModel;

/* A new model with zeroed weights (use df_unet_init, or training). */
DfModel     *df_model_new            (const DfUNetConfig *cfg, gboolean classifier,
                                      const DfSchedule *schedule,
                                      const char *const *class_names,
                                      int uncond_class, GError **error);
DfModel     *df_model_load           (const char *path, GError **error);
gboolean     df_model_save           (DfModel *m, const char *path, GError **error);
/* The __metadata__ above as a NULL-terminated key, value, ... list (for
 * files that carry a model and more, such as checkpoints); g_strfreev. */
char       **df_model_metadata       (DfModel *m);
void         df_model_free           (DfModel *m);

DfUNet      *df_model_net            (DfModel *m);
const DfSchedule *df_model_schedule  (DfModel *m);
gboolean     df_model_is_classifier  (DfModel *m);
int          df_model_channels       (DfModel *m);
int          df_model_size           (DfModel *m);          /* sample_size */
int          df_model_num_classes    (DfModel *m);          /* named classes */
const char  *df_model_class_name     (DfModel *m, int label);
int          df_model_class_lookup   (DfModel *m, const char *name_or_index);
int          df_model_uncond_class   (DfModel *m);          /* -1: none */
const char  *df_model_path           (DfModel *m);

/* The most threads df_set_threads uses. */
#define DF_MAX_THREADS 256

/* Threads for OpenBLAS and the engine's own loops (0: all cores; at most
 * DF_MAX_THREADS). */
void         df_set_threads          (int n);
int          df_get_threads          (void);

/* eps[N,C,H,W] for x at timestep t, labels NULL or [N]. */
gboolean     df_model_eps            (DfModel *m, const float *x, int n, int t,
                                      const int *labels, float *eps,
                                      GError **error);
/* Classifier: logits[N,K] at timestep t. */
gboolean     df_model_logits         (DfModel *m, const float *x, int n, int t,
                                      float *logits, GError **error);

/* A DfGradFunc over a classifier (user_data the DfModel): grad[N,C,H,W] =
 * d/dx sum_i log softmax(logits(x_i, t))[labels[i]]. */
gboolean     df_model_class_grad     (gpointer classifier, const float *x,
                                      int n, int t, const int *labels,
                                      float *grad, GError **error);

/* count samples (indices 0..count-1) in batches of batch into out
 * [count,C,H,W] in [-1, 1].  classifier: for DF_GUIDANCE_CLASSIFIER. */
gboolean     df_model_generate       (DfModel *m, DfModel *classifier,
                                      const DfSampleParams *p, int count,
                                      int batch, float *out,
                                      DfProgressFunc progress, gpointer data,
                                      GCancellable *cancellable, GError **error);
/* frames DDIM eta-0 decodes of slerp(x_T(seed_a), x_T(seed_b)) (sample
 * index 0 of each seed) into out[frames,C,H,W]; frame 0 equals generating
 * seed_a alone with the same p. */
gboolean     df_model_interpolate    (DfModel *m, const DfSampleParams *p,
                                      guint64 seed_a, guint64 seed_b,
                                      int frames, int batch, float *out,
                                      DfProgressFunc progress, gpointer data,
                                      GCancellable *cancellable, GError **error);

/* Classes that must be m's: n of them, and, where both sides have names
 * (not just the indices "0", "1", ... of a file saved without names), the
 * same names in the same order.  what names the other side in the error:
 * "--test-data DIR has classes a, b; the model M has x, y, z". */
gboolean      df_model_check_classes     (DfModel *m, const char *what,
                                          int n, const char *const *names,
                                          GError **error);
/* The same for a noisy classifier that is to guide m; what ("--classifier")
 * comes before its path in the error. */
gboolean      df_model_check_classifier  (DfModel *m, DfModel *classifier,
                                          const char *what, GError **error);

G_END_DECLS
