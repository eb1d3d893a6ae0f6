/* job.h: one run of a procedure on the engine, from checked settings to
 * float images, plus what the front end needs to present the results
 * (layer names, JSON parameters, 8-bit pixels).  No GIMP, no GTK.
 *
 * A job is made in the calling thread (df_job_new loads the models and
 * checks the settings against them) and may then run in another thread.
 */
#pragma once

#include <gio/gio.h>

#include "model.h"
#include "params.h"

G_BEGIN_DECLS

typedef struct {
  DfPluginParams params;    /* as run: random seeds drawn, paths resolved */
  char          *model_path;
  char          *classifier_path;  /* NULL unless classifier guidance */
  DfModel       *model;
  DfModel       *classifier;

  int            n;          /* number of results: count or frames */
  int            channels, height, width;
  float         *images;     /* [n,C,H,W] in [-1, 1], NULL until run */
  double         seconds;    /* wall time of df_job_run's engine call */
} DfJob;

/* Resolves paths and random seeds, loads the model (and the classifier for
 * classifier guidance) and checks p against them.  Bad settings, a missing
 * file or a model that does not fit are DF_PLUGIN_ERROR_CALLING; a file
 * the engine cannot read is DF_PLUGIN_ERROR_EXECUTION with its message. */
DfJob      *df_job_new            (const DfPluginParams *p, GError **error);
void        df_job_free           (DfJob *job);

/* Progress: fraction of the whole job in [0, 1] after each denoising step,
 * with the first sample's predicted x0 [C,H,W] in [-1, 1] (NULL at the
 * end).  Called in the thread that runs the job. */
typedef void (*DfJobProgress) (gpointer data, double fraction,
                               const float *x0, int channels, int height,
                               int width);

/* Runs the engine.  On failure or cancel (DF_PLUGIN_ERROR_CANCELLED)
 * job->images stays NULL. */
gboolean    df_job_run            (DfJob *job, DfJobProgress progress,
                                   gpointer data, GCancellable *cancellable,
                                   GError **error);

/* "Diffusion: Sneaker, seed 7, DDIM 50, eta 0.0"; frames end in
 * " (100ms)" for GIMP's animation playback. */
char       *df_job_layer_name     (const DfJob *job, int i);
/* The settings that made result i, as a JSON object. */
char       *df_job_params_json    (const DfJob *job, int i);

/* x in [-1, 1] -> round ((x + 1) / 2 * 255), clamped. */
guint8      df_float_to_u8        (float x);
/* Result i as 8-bit pixels into out [H,W,bpp]: RGB when rgb (gray output
 * replicated), else gray (RGB output as its Rec. 601 luma), followed by
 * alpha 255 when alpha. */
void        df_job_result_pixels  (const DfJob *job, int i, gboolean rgb,
                                   gboolean alpha, guint8 *out);

G_END_DECLS
