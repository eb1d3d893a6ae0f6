/* params.h: the settings of one diffusion job, as the plug-in's three
 * procedures and the dialog see them, and where the shipped weights live.
 *
 * The struct has no pointers, so the plug-in saves it as is with
 * gimp_set_data () for "Repeat" and last-values runs.
 */
#pragma once

#include <glib.h>

#include "sampler.h"

G_BEGIN_DECLS

#define DF_PLUGIN_ERROR (df_plugin_error_quark ())
GQuark df_plugin_error_quark (void);

typedef enum {
  DF_PLUGIN_ERROR_CALLING,      /* a bad argument: the caller can fix it */
  DF_PLUGIN_ERROR_EXECUTION,    /* the engine failed */
  DF_PLUGIN_ERROR_CANCELLED
} DfPluginError;

typedef enum {
  DF_PROC_GENERATE,
  DF_PROC_INTERPOLATE,
  DF_PROC_CLASS_GUIDED
} DfProcKind;

#define DF_N_PROCS 3

#define DF_PARAMS_PATH_MAX 1024

/* Limits of the procedures' arguments (the dialog's ranges too). */
#define DF_MAX_STEPS  1000
#define DF_MAX_COUNT  64
#define DF_MAX_FRAMES 64
#define DF_MAX_SCALE  DF_GUIDE_SCALE_MAX

typedef struct {
  gint32 kind;                          /* DfProcKind */
  char   model[DF_PARAMS_PATH_MAX];     /* "" = the shipped default */
  gint32 count;
  gint32 steps;
  double eta;                           /* DDIM only, 0..1 */
  gint32 seed;                          /* -1 = random */
  gint32 sampler;                       /* 0 DDIM, 1 DDPM */
  gint32 class_label;                   /* -1 = none */
  gint32 guidance;                      /* 0 classifier-free, 1 classifier */
  double scale;
  char   classifier[DF_PARAMS_PATH_MAX];/* "" = the shipped classifier */
  gint32 seed_b;                        /* interpolation's second seed */
  gint32 frames;
} DfPluginParams;

/* Defaults for kind: shipped model, 1 sample, DDIM 50 steps, eta 0, random
 * seed, class 0 for class-guided (-1 otherwise), classifier-free guidance
 * at scale 3, seed_b random, 8 frames. */
void         df_plugin_params_init     (DfPluginParams *p, DfProcKind kind);

/* Range checks that need no model; the model-dependent ones (steps <= T,
 * class < number of classes) are done by df_job_new (). */
gboolean     df_plugin_params_check    (const DfPluginParams *p, GError **error);

/* "plug-in-diffusion-generate", ... */
const char  *df_proc_name              (DfProcKind kind);
/* -1 if name is none of the three. */
int          df_proc_kind_from_name    (const char *name);

/* $DIFFUSE_WEIGHTS if set, else the directory the weights are installed in. */
const char  *df_weights_dir            (void);
/* model "" -> the shipped UNet, classifier "" -> the shipped classifier,
 * anything else as given. */
char        *df_resolve_model_path     (const char *path, gboolean classifier);

/* Safe copy of a path into one of the struct's fields. */
void         df_plugin_params_set_path (char *field, const char *path);

G_END_DECLS
