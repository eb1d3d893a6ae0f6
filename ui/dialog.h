/* dialog.h: the GTK3 dialog that edits a DfPluginParams and runs the job
 * with a live preview, a progress bar and Cancel.  No GIMP calls: the
 * plug-in hands in the settings and gets back a finished job.
 *
 * Every widget writes its value into the params as soon as it changes.
 * Generate runs the job in a worker thread (the dialog stays live); Cancel
 * stops a running job within one denoising step and discards its results;
 * Cancel while idle, or closing the window, ends the dialog with no job.
 */
#pragma once

#include <gtk/gtk.h>

#include "job.h"
#include "params.h"

G_BEGIN_DECLS

typedef struct _DfDialog DfDialog;

typedef enum {
  DF_DIALOG_IDLE,
  DF_DIALOG_RUNNING,
  DF_DIALOG_DONE,           /* a job finished: df_dialog_run returns it */
  DF_DIALOG_CLOSED          /* cancelled or closed while idle */
} DfDialogState;

/* Called in the main thread after each step of a running job (fraction in
 * [0, 1]); the plug-in moves GIMP's progress bar with it. */
typedef void (*DfDialogProgressHook) (gpointer data, double fraction);

/* params is edited in place and must outlive the dialog. */
DfDialog      *df_dialog_new            (DfPluginParams *params);
void           df_dialog_free           (DfDialog *d);
GtkWidget     *df_dialog_get_window     (DfDialog *d);

/* Widgets by name, for tests and the plug-in: "model", "model-file",
 * "steps", "eta", "sampler", "seed", "dice", "count", "class", "guidance",
 * "scale", "classifier-file", "seed-b", "frames", "preview", "progress",
 * "status", "generate", "cancel". */
GtkWidget     *df_dialog_get_widget     (DfDialog *d, const char *name);

void           df_dialog_set_progress_hook (DfDialog *d,
                                            DfDialogProgressHook hook,
                                            gpointer data);
/* Keep the dialog above the X11 window xid (GIMP's image window). */
void           df_dialog_set_transient_for_xid (DfDialog *d, gulong xid);

/* Same as pressing the buttons. */
void           df_dialog_generate       (DfDialog *d);
void           df_dialog_cancel         (DfDialog *d);

DfDialogState  df_dialog_get_state      (DfDialog *d);
/* The error of the last job (DF_PLUGIN_ERROR_CANCELLED after a cancel),
 * NULL if it succeeded or none ran. */
const GError  *df_dialog_get_last_error (DfDialog *d);
/* Progress callbacks delivered to the main thread by the last job. */
int            df_dialog_get_steps_seen (DfDialog *d);

/* Shows the dialog and runs a main loop until a job finished (returns it,
 * owned by the caller) or the user cancelled or closed it (NULL). */
DfJob         *df_dialog_run            (DfDialog *d);

G_END_DECLS
