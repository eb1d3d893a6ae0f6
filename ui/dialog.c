/* dialog.c: the GTK3 dialog.  The job runs in a GTask worker thread; its
 * progress (fraction and the first sample's predicted x0) is handed to the
 * main thread through a mutex-guarded slot and one idle source at a time,
 * so a fast sampler never floods the main loop. */
#include "dialog.h"

#include <string.h>

#ifdef GDK_WINDOWING_X11
#include <gdk/gdkx.h>
#endif

#define PREVIEW_SIZE 112

struct _DfDialog {
  DfPluginParams      *params;
  GtkWidget           *window;
  GtkWidget           *grid;
  GHashTable          *widgets;       /* name -> GtkWidget (not owned) */
  int                  row;
  gboolean             filling;       /* repopulating combos: no writes */

  DfDialogState        state;
  gboolean             close_requested;
  GCancellable        *cancellable;
  DfJob               *job;
  GError              *last_error;
  GMainLoop           *loop;
  DfDialogProgressHook hook;
  gpointer             hook_data;
  gulong               xid;

  /* Shared with the worker thread, under lock. */
  GMutex               lock;
  float               *x0;            /* [C,H,W] of the first sample */
  gboolean             have_x0;
  int                  c, h, w;
  double               fraction;
  int                  worker_steps;
  guint                idle_id;
};

static void
set_status (DfDialog *d, const char *text)
{
  gtk_label_set_text (GTK_LABEL (g_hash_table_lookup (d->widgets, "status")),
                      text);
}

static void
add_row (DfDialog *d, const char *label, const char *name, GtkWidget *w)
{
  GtkWidget *l = gtk_label_new_with_mnemonic (label);

  gtk_label_set_xalign (GTK_LABEL (l), 0.0);
  gtk_label_set_mnemonic_widget (GTK_LABEL (l), w);
  gtk_widget_set_hexpand (w, TRUE);
  gtk_grid_attach (GTK_GRID (d->grid), l, 0, d->row, 1, 1);
  gtk_grid_attach (GTK_GRID (d->grid), w, 1, d->row, 1, 1);
  d->row++;
  g_hash_table_insert (d->widgets, (gpointer) name, w);
}

static GtkWidget *
spin_new (double lo, double hi, double step, int digits, double value)
{
  GtkWidget *s = gtk_spin_button_new_with_range (lo, hi, step);

  gtk_spin_button_set_digits (GTK_SPIN_BUTTON (s), digits);
  gtk_spin_button_set_numeric (GTK_SPIN_BUTTON (s), TRUE);
  gtk_spin_button_set_value (GTK_SPIN_BUTTON (s), value);
  return s;
}

/* ---- widgets -> params ---- */

static void
int_changed (GtkSpinButton *spin, gint32 *field)
{
  *field = gtk_spin_button_get_value_as_int (spin);
}

static void
double_spin_changed (GtkSpinButton *spin, double *field)
{
  *field = gtk_spin_button_get_value (spin);
}

static void
eta_changed (GtkRange *range, DfDialog *d)
{
  d->params->eta = gtk_range_get_value (range);
}

static void
sampler_changed (GtkComboBox *combo, DfDialog *d)
{
  d->params->sampler = gtk_combo_box_get_active (combo) == 1 ? 1 : 0;
  /* eta only means something for DDIM. */
  gtk_widget_set_sensitive (g_hash_table_lookup (d->widgets, "eta"),
                            d->params->sampler == 0);
}

static void
guidance_changed (GtkComboBox *combo, DfDialog *d)
{
  GtkWidget *file = g_hash_table_lookup (d->widgets, "classifier-file");

  d->params->guidance = gtk_combo_box_get_active (combo) == 1 ? 1 : 0;
  gtk_widget_set_sensitive (file, d->params->guidance == 1);
}

static void
class_changed (GtkComboBox *combo, DfDialog *d)
{
  const char *id = gtk_combo_box_get_active_id (combo);

  if (!d->filling && id != NULL)
    d->params->class_label = atoi (id);
}

static void
dice_clicked (GtkButton *button, DfDialog *d)
{
  gtk_spin_button_set_value (g_hash_table_lookup (d->widgets, "seed"),
                             g_random_int_range (0, G_MAXINT32));
}

/* Refill the class combo from the chosen model's class names, keeping the
 * chosen class when the new model has it; limit steps to its T. */
static void
reload_model_info (DfDialog *d)
{
  GtkWidget *combo = g_hash_table_lookup (d->widgets, "class");
  GtkWidget *steps = g_hash_table_lookup (d->widgets, "steps");
  char *path = df_resolve_model_path (d->params->model, FALSE);
  GError *error = NULL;
  DfModel *m = df_model_load (path, &error);
  int k = 0;

  if (m == NULL)
    {
      char *msg = g_strdup_printf ("Cannot read model: %s", error->message);

      set_status (d, msg);
      g_free (msg);
      g_clear_error (&error);
    }
  else
    {
      int T = df_model_schedule (m)->T;

      k = df_model_num_classes (m);
      gtk_spin_button_set_range (GTK_SPIN_BUTTON (steps), 1,
                                 MIN (T, DF_MAX_STEPS));
      set_status (d, "");
    }

  if (combo != NULL)
    {
      gboolean none_ok = d->params->kind == DF_PROC_INTERPOLATE;
      char id[16];

      d->filling = TRUE;
      gtk_combo_box_text_remove_all (GTK_COMBO_BOX_TEXT (combo));
      if (none_ok)
        gtk_combo_box_text_append (GTK_COMBO_BOX_TEXT (combo), "-1", "None");
      for (int i = 0; i < k; i++)
        {
          const char *name = df_model_class_name (m, i);
          char *text = name != NULL && name[0] != '\0'
                       ? g_strdup (name) : g_strdup_printf ("Class %d", i);

          g_snprintf (id, sizeof id, "%d", i);
          gtk_combo_box_text_append (GTK_COMBO_BOX_TEXT (combo), id, text);
          g_free (text);
        }
      if (d->params->class_label >= k)
        d->params->class_label = none_ok ? -1 : 0;
      if (d->params->class_label < 0 && !none_ok)
        d->params->class_label = 0;
      g_snprintf (id, sizeof id, "%d", d->params->class_label);
      d->filling = FALSE;
      gtk_combo_box_set_active_id (GTK_COMBO_BOX (combo), id);
      gtk_widget_set_sensitive (combo, k > 0);
    }

  if (m != NULL)
    df_model_free (m);
  g_free (path);
}

static void
model_changed (GtkComboBox *combo, DfDialog *d)
{
  const char *id = gtk_combo_box_get_active_id (combo);

  if (d->filling || id == NULL)
    return;
  df_plugin_params_set_path (d->params->model, id);
  reload_model_info (d);
}

/* Select path in the model combo, adding it if it is not listed. */
static void
select_model (DfDialog *d, const char *path)
{
  GtkComboBox *combo = g_hash_table_lookup (d->widgets, "model");

  if (!gtk_combo_box_set_active_id (combo, path))
    {
      char *base = g_path_get_basename (path);

      gtk_combo_box_text_append (GTK_COMBO_BOX_TEXT (combo), path, base);
      g_free (base);
      gtk_combo_box_set_active_id (combo, path);
    }
}

static void
model_file_set (GtkFileChooserButton *button, DfDialog *d)
{
  char *path = gtk_file_chooser_get_filename (GTK_FILE_CHOOSER (button));

  if (path != NULL)
    select_model (d, path);
  g_free (path);
}

static void
classifier_file_set (GtkFileChooserButton *button, DfDialog *d)
{
  char *path = gtk_file_chooser_get_filename (GTK_FILE_CHOOSER (button));

  df_plugin_params_set_path (d->params->classifier, path);
  g_free (path);
}

/* Shipped UNets (not classifiers) in the weights folder; "" stands for
 * the default one. */
static void
fill_model_combo (DfDialog *d, GtkWidget *combo)
{
  const char *dir = df_weights_dir ();
  char *dflt = df_resolve_model_path ("", FALSE);
  GDir *gdir = g_dir_open (dir, 0, NULL);
  const char *name;

  gtk_combo_box_text_append (GTK_COMBO_BOX_TEXT (combo), "",
                             "Fashion-MNIST (shipped)");
  while (gdir != NULL && (name = g_dir_read_name (gdir)) != NULL)
    {
      char *path;

      if (!g_str_has_suffix (name, ".safetensors")
          || strstr (name, "classifier") != NULL)
        continue;
      path = g_build_filename (dir, name, NULL);
      if (g_strcmp0 (path, dflt) != 0)
        gtk_combo_box_text_append (GTK_COMBO_BOX_TEXT (combo), path, name);
      g_free (path);
    }
  if (gdir != NULL)
    g_dir_close (gdir);
  g_free (dflt);
}

/* ---- building ---- */

static GtkWidget *
model_row (DfDialog *d)
{
  GtkWidget *box = gtk_box_new (GTK_ORIENTATION_HORIZONTAL, 6);
  GtkWidget *combo = gtk_combo_box_text_new ();
  GtkWidget *file = gtk_file_chooser_button_new ("Choose a model file",
                                                 GTK_FILE_CHOOSER_ACTION_OPEN);
  GtkFileFilter *filter = gtk_file_filter_new ();

  gtk_file_filter_set_name (filter, "Models (*.safetensors)");
  gtk_file_filter_add_pattern (filter, "*.safetensors");
  gtk_file_chooser_add_filter (GTK_FILE_CHOOSER (file), filter);
  fill_model_combo (d, combo);
  gtk_widget_set_hexpand (combo, TRUE);
  gtk_box_pack_start (GTK_BOX (box), combo, TRUE, TRUE, 0);
  gtk_box_pack_start (GTK_BOX (box), file, FALSE, FALSE, 0);
  g_hash_table_insert (d->widgets, "model", combo);
  g_hash_table_insert (d->widgets, "model-file", file);
  g_signal_connect (file, "file-set", G_CALLBACK (model_file_set), d);
  return box;
}

static void
build_settings (DfDialog *d)
{
  DfPluginParams *p = d->params;
  GtkWidget *w, *box;

  add_row (d, "_Model:", "model-row", model_row (d));

  if (p->kind == DF_PROC_INTERPOLATE)
    {
      add_row (d, "Seed _A:", "seed",
               spin_new (-1, G_MAXINT32, 1, 0, p->seed));
      add_row (d, "Seed _B:", "seed-b",
               spin_new (-1, G_MAXINT32, 1, 0, p->seed_b));
      g_signal_connect (g_hash_table_lookup (d->widgets, "seed-b"),
                        "value-changed", G_CALLBACK (int_changed), &p->seed_b);
      add_row (d, "_Frames:", "frames",
               spin_new (2, DF_MAX_FRAMES, 1, 0, p->frames));
      g_signal_connect (g_hash_table_lookup (d->widgets, "frames"),
                        "value-changed", G_CALLBACK (int_changed), &p->frames);
    }
  else
    {
      /* Seed with a dice button that draws a new one. */
      box = gtk_box_new (GTK_ORIENTATION_HORIZONTAL, 6);
      w = spin_new (-1, G_MAXINT32, 1, 0, p->seed);
      gtk_widget_set_tooltip_text (w, "-1 draws a random seed for each run");
      gtk_box_pack_start (GTK_BOX (box), w, TRUE, TRUE, 0);
      g_hash_table_insert (d->widgets, "seed", w);
      w = gtk_button_new_from_icon_name ("media-playlist-shuffle",
                                         GTK_ICON_SIZE_BUTTON);
      gtk_widget_set_tooltip_text (w, "Random seed");
      gtk_box_pack_start (GTK_BOX (box), w, FALSE, FALSE, 0);
      g_hash_table_insert (d->widgets, "dice", w);
      g_signal_connect (w, "clicked", G_CALLBACK (dice_clicked), d);
      add_row (d, "S_eed:", "seed-row", box);

      add_row (d, "C_ount:", "count",
               spin_new (1, DF_MAX_COUNT, 1, 0, p->count));
      g_signal_connect (g_hash_table_lookup (d->widgets, "count"),
                        "value-changed", G_CALLBACK (int_changed), &p->count);
    }
  g_signal_connect (g_hash_table_lookup (d->widgets, "seed"),
                    "value-changed", G_CALLBACK (int_changed), &p->seed);

  add_row (d, "_Steps:", "steps", spin_new (1, DF_MAX_STEPS, 1, 0, p->steps));
  g_signal_connect (g_hash_table_lookup (d->widgets, "steps"),
                    "value-changed", G_CALLBACK (int_changed), &p->steps);

  if (p->kind != DF_PROC_INTERPOLATE)
    {
      w = gtk_combo_box_text_new ();
      gtk_combo_box_text_append_text (GTK_COMBO_BOX_TEXT (w), "DDIM");
      gtk_combo_box_text_append_text (GTK_COMBO_BOX_TEXT (w), "DDPM");
      add_row (d, "Sa_mpler:", "sampler", w);

      w = gtk_scale_new_with_range (GTK_ORIENTATION_HORIZONTAL, 0, 1, 0.01);
      gtk_scale_set_digits (GTK_SCALE (w), 2);
      gtk_scale_set_value_pos (GTK_SCALE (w), GTK_POS_RIGHT);
      gtk_range_set_value (GTK_RANGE (w), p->eta);
      g_signal_connect (w, "value-changed", G_CALLBACK (eta_changed), d);
      add_row (d, "_Eta:", "eta", w);

      w = g_hash_table_lookup (d->widgets, "sampler");
      g_signal_connect (w, "changed", G_CALLBACK (sampler_changed), d);
      gtk_combo_box_set_active (GTK_COMBO_BOX (w), p->sampler == 1 ? 1 : 0);
    }

  if (p->kind != DF_PROC_GENERATE)
    {
      w = gtk_combo_box_text_new ();
      g_signal_connect (w, "changed", G_CALLBACK (class_changed), d);
      add_row (d, "C_lass:", "class", w);
    }

  if (p->kind == DF_PROC_CLASS_GUIDED)
    {
      GtkFileFilter *filter = gtk_file_filter_new ();

      w = gtk_combo_box_text_new ();
      gtk_combo_box_text_append_text (GTK_COMBO_BOX_TEXT (w),
                                      "Classifier-free");
      gtk_combo_box_text_append_text (GTK_COMBO_BOX_TEXT (w), "Classifier");
      add_row (d, "_Guidance:", "guidance", w);

      add_row (d, "Sc_ale:", "scale",
               spin_new (0, DF_MAX_SCALE, 0.5, 1, p->scale));
      g_signal_connect (g_hash_table_lookup (d->widgets, "scale"),
                        "value-changed", G_CALLBACK (double_spin_changed),
                        &p->scale);

      w = gtk_file_chooser_button_new ("Choose a classifier file",
                                       GTK_FILE_CHOOSER_ACTION_OPEN);
      gtk_file_filter_set_name (filter, "Models (*.safetensors)");
      gtk_file_filter_add_pattern (filter, "*.safetensors");
      gtk_file_chooser_add_filter (GTK_FILE_CHOOSER (w), filter);
      if (p->classifier[0] != '\0')
        gtk_file_chooser_set_filename (GTK_FILE_CHOOSER (w), p->classifier);
      gtk_widget_set_tooltip_text (w, "Unset: the shipped classifier");
      g_signal_connect (w, "file-set", G_CALLBACK (classifier_file_set), d);
      add_row (d, "Classi_fier:", "classifier-file", w);

      w = g_hash_table_lookup (d->widgets, "guidance");
      g_signal_connect (w, "changed", G_CALLBACK (guidance_changed), d);
      gtk_combo_box_set_active (GTK_COMBO_BOX (w), p->guidance == 1 ? 1 : 0);
    }

  /* Select the model last: it fills the class combo and the steps range. */
  w = g_hash_table_lookup (d->widgets, "model");
  g_signal_connect (w, "changed", G_CALLBACK (model_changed), d);
  select_model (d, p->model);
}

static GdkPixbuf *
blank_preview (void)
{
  GdkPixbuf *pb = gdk_pixbuf_new (GDK_COLORSPACE_RGB, FALSE, 8,
                                  PREVIEW_SIZE, PREVIEW_SIZE);

  gdk_pixbuf_fill (pb, 0x808080ff);
  return pb;
}

static void
set_preview (DfDialog *d, GdkPixbuf *pb)
{
  gtk_image_set_from_pixbuf (g_hash_table_lookup (d->widgets, "preview"), pb);
  g_object_unref (pb);
}

static void
on_realize (GtkWidget *window, DfDialog *d)
{
#ifdef GDK_WINDOWING_X11
  GdkDisplay *display = gtk_widget_get_display (window);
  GdkWindow *parent;

  if (d->xid == 0 || !GDK_IS_X11_DISPLAY (display))
    return;
  parent = gdk_x11_window_foreign_new_for_display (display, d->xid);
  if (parent != NULL)
    {
      gdk_window_set_transient_for (gtk_widget_get_window (window), parent);
      g_object_unref (parent);
    }
#endif
}

static void on_response (GtkDialog *dialog, int response, DfDialog *d);

static const char *const titles[DF_N_PROCS] = {
  "Diffusion: Generate",
  "Diffusion: Interpolate between seeds",
  "Diffusion: Class-guided",
};

DfDialog *
df_dialog_new (DfPluginParams *params)
{
  DfDialog *d;
  GtkWidget *content, *hbox, *vbox, *frame, *w;

  g_return_val_if_fail (params != NULL, NULL);
  g_return_val_if_fail (params->kind >= 0 && params->kind < DF_N_PROCS, NULL);

  d = g_new0 (DfDialog, 1);
  d->params = params;
  d->widgets = g_hash_table_new (g_str_hash, g_str_equal);
  g_mutex_init (&d->lock);

  d->window = gtk_dialog_new ();
  gtk_window_set_title (GTK_WINDOW (d->window), titles[params->kind]);
  gtk_window_set_resizable (GTK_WINDOW (d->window), FALSE);
  g_object_ref_sink (d->window);
  w = gtk_dialog_add_button (GTK_DIALOG (d->window), "_Cancel",
                             GTK_RESPONSE_CANCEL);
  g_hash_table_insert (d->widgets, "cancel", w);
  w = gtk_dialog_add_button (GTK_DIALOG (d->window), "_Generate",
                             GTK_RESPONSE_OK);
  g_hash_table_insert (d->widgets, "generate", w);
  gtk_dialog_set_default_response (GTK_DIALOG (d->window), GTK_RESPONSE_OK);
  g_signal_connect (d->window, "response", G_CALLBACK (on_response), d);
  g_signal_connect (d->window, "realize", G_CALLBACK (on_realize), d);

  content = gtk_dialog_get_content_area (GTK_DIALOG (d->window));
  gtk_container_set_border_width (GTK_CONTAINER (content), 12);
  gtk_box_set_spacing (GTK_BOX (content), 8);
  hbox = gtk_box_new (GTK_ORIENTATION_HORIZONTAL, 12);
  gtk_box_pack_start (GTK_BOX (content), hbox, TRUE, TRUE, 0);

  /* Status first: loading the model may report into it. */
  w = gtk_label_new ("");
  gtk_label_set_xalign (GTK_LABEL (w), 0.0);
  gtk_label_set_line_wrap (GTK_LABEL (w), TRUE);
  gtk_label_set_max_width_chars (GTK_LABEL (w), 60);
  g_hash_table_insert (d->widgets, "status", w);

  d->grid = gtk_grid_new ();
  gtk_grid_set_row_spacing (GTK_GRID (d->grid), 6);
  gtk_grid_set_column_spacing (GTK_GRID (d->grid), 12);
  gtk_box_pack_start (GTK_BOX (hbox), d->grid, TRUE, TRUE, 0);

  vbox = gtk_box_new (GTK_ORIENTATION_VERTICAL, 6);
  gtk_box_pack_start (GTK_BOX (hbox), vbox, FALSE, FALSE, 0);
  frame = gtk_frame_new ("Preview");
  gtk_box_pack_start (GTK_BOX (vbox), frame, FALSE, FALSE, 0);
  w = gtk_image_new ();
  gtk_widget_set_size_request (w, PREVIEW_SIZE, PREVIEW_SIZE);
  gtk_container_add (GTK_CONTAINER (frame), w);
  g_hash_table_insert (d->widgets, "preview", w);
  set_preview (d, blank_preview ());

  build_settings (d);

  w = gtk_progress_bar_new ();
  gtk_progress_bar_set_show_text (GTK_PROGRESS_BAR (w), TRUE);
  gtk_progress_bar_set_text (GTK_PROGRESS_BAR (w), "");
  gtk_box_pack_start (GTK_BOX (content), w, FALSE, FALSE, 0);
  g_hash_table_insert (d->widgets, "progress", w);
  gtk_box_pack_start (GTK_BOX (content),
                      g_hash_table_lookup (d->widgets, "status"),
                      FALSE, FALSE, 0);

  gtk_widget_show_all (content);
  return d;
}

/* ---- running ---- */

static gboolean show_progress (gpointer data);

/* Worker thread: keep the newest x0 and schedule one idle to show it. */
static void
job_progress (gpointer data, double fraction, const float *x0, int c, int h,
              int w)
{
  DfDialog *d = data;

  g_mutex_lock (&d->lock);
  d->fraction = fraction;
  if (x0 != NULL && d->x0 != NULL && c == d->c && h == d->h && w == d->w)
    {
      memcpy (d->x0, x0, sizeof (float) * c * h * w);
      d->have_x0 = TRUE;
      d->worker_steps++;
    }
  if (d->idle_id == 0)
    d->idle_id = g_idle_add (show_progress, d);
  g_mutex_unlock (&d->lock);
}

/* Main thread: x0 [C,H,W] -> an RGB pixbuf scaled to the preview size. */
static GdkPixbuf *
x0_to_pixbuf (const float *x0, int c, int h, int w)
{
  GdkPixbuf *small = gdk_pixbuf_new (GDK_COLORSPACE_RGB, FALSE, 8, w, h);
  GdkPixbuf *big;
  guint8 *pix = gdk_pixbuf_get_pixels (small);
  int stride = gdk_pixbuf_get_rowstride (small);
  gsize plane = (gsize) h * w;
  int scale = MAX (1, PREVIEW_SIZE / MAX (h, w));

  for (int y = 0; y < h; y++)
    for (int x = 0; x < w; x++)
      for (int k = 0; k < 3; k++)
        pix[y * stride + x * 3 + k] =
          df_float_to_u8 (x0[(c == 3 ? k : 0) * plane + y * w + x]);

  big = gdk_pixbuf_scale_simple (small, w * scale, h * scale,
                                 GDK_INTERP_NEAREST);
  g_object_unref (small);
  return big;
}

static gboolean
show_progress (gpointer data)
{
  DfDialog *d = data;
  GdkPixbuf *pb = NULL;
  double fraction;
  char text[32];

  g_mutex_lock (&d->lock);
  d->idle_id = 0;
  fraction = d->fraction;
  if (d->have_x0 && d->state == DF_DIALOG_RUNNING)
    pb = x0_to_pixbuf (d->x0, d->c, d->h, d->w);
  g_mutex_unlock (&d->lock);

  if (d->state != DF_DIALOG_RUNNING)
    {
      g_clear_object (&pb);
      return G_SOURCE_REMOVE;
    }
  if (pb != NULL)
    set_preview (d, pb);
  gtk_progress_bar_set_fraction (g_hash_table_lookup (d->widgets, "progress"),
                                 fraction);
  g_snprintf (text, sizeof text, "%.0f%%", 100.0 * fraction);
  gtk_progress_bar_set_text (g_hash_table_lookup (d->widgets, "progress"),
                             text);
  if (d->hook != NULL)
    d->hook (d->hook_data, fraction);
  return G_SOURCE_REMOVE;
}

static void
job_worker (GTask *task, gpointer source, gpointer task_data,
            GCancellable *cancellable)
{
  GError *error = NULL;

  if (df_job_run (task_data, job_progress,
                  g_task_get_source_tag (task), cancellable, &error))
    g_task_return_boolean (task, TRUE);
  else
    g_task_return_error (task, error);
}

static void
set_running (DfDialog *d, gboolean running)
{
  d->state = running ? DF_DIALOG_RUNNING : DF_DIALOG_IDLE;
  gtk_widget_set_sensitive (d->grid, !running);
  gtk_widget_set_sensitive (g_hash_table_lookup (d->widgets, "generate"),
                            !running);
}

static void
job_done (GObject *source, GAsyncResult *result, gpointer data)
{
  DfDialog *d = data;
  GTask *task = G_TASK (result);
  GError *error = NULL;
  GtkWidget *bar = g_hash_table_lookup (d->widgets, "progress");

  g_task_propagate_boolean (task, &error);
  g_clear_object (&d->cancellable);

  g_mutex_lock (&d->lock);
  if (d->idle_id != 0)
    g_source_remove (d->idle_id);
  d->idle_id = 0;
  g_mutex_unlock (&d->lock);

  if (error == NULL)
    {
      d->state = DF_DIALOG_DONE;
      gtk_progress_bar_set_fraction (GTK_PROGRESS_BAR (bar), 1.0);
      gtk_progress_bar_set_text (GTK_PROGRESS_BAR (bar), "Done");
      if (d->hook != NULL)
        d->hook (d->hook_data, 1.0);
      if (d->loop != NULL)
        g_main_loop_quit (d->loop);
      return;
    }

  /* Cancelled or failed: discard everything the job made. */
  g_clear_pointer (&d->job, df_job_free);
  if (g_error_matches (error, G_IO_ERROR, G_IO_ERROR_CANCELLED))
    {
      g_clear_error (&error);
      g_set_error_literal (&error, DF_PLUGIN_ERROR, DF_PLUGIN_ERROR_CANCELLED,
                           "cancelled");
    }
  g_clear_error (&d->last_error);
  d->last_error = error;
  set_running (d, FALSE);
  gtk_progress_bar_set_fraction (GTK_PROGRESS_BAR (bar), 0.0);
  gtk_progress_bar_set_text (GTK_PROGRESS_BAR (bar), "");
  set_preview (d, blank_preview ());
  if (g_error_matches (error, DF_PLUGIN_ERROR, DF_PLUGIN_ERROR_CANCELLED))
    set_status (d, "Cancelled: nothing was added.");
  else
    set_status (d, error->message);

  if (d->close_requested)
    {
      d->state = DF_DIALOG_CLOSED;
      if (d->loop != NULL)
        g_main_loop_quit (d->loop);
    }
}

void
df_dialog_generate (DfDialog *d)
{
  GError *error = NULL;
  GTask *task;

  g_return_if_fail (d != NULL);
  if (d->state != DF_DIALOG_IDLE)
    return;

  g_clear_error (&d->last_error);
  d->job = df_job_new (d->params, &error);
  if (d->job == NULL)
    {
      set_status (d, error->message);
      d->last_error = error;
      return;
    }

  g_mutex_lock (&d->lock);
  g_free (d->x0);
  d->c = d->job->channels;
  d->h = d->job->height;
  d->w = d->job->width;
  d->x0 = g_new0 (float, (gsize) d->c * d->h * d->w);
  d->have_x0 = FALSE;
  d->worker_steps = 0;
  d->fraction = 0.0;
  g_mutex_unlock (&d->lock);

  set_running (d, TRUE);
  set_status (d, "Sampling...");
  d->cancellable = g_cancellable_new ();
  task = g_task_new (NULL, d->cancellable, job_done, d);
  g_task_set_source_tag (task, d);
  g_task_set_task_data (task, d->job, NULL);
  g_task_run_in_thread (task, job_worker);
  g_object_unref (task);
}

void
df_dialog_cancel (DfDialog *d)
{
  g_return_if_fail (d != NULL);

  if (d->state == DF_DIALOG_RUNNING)
    {
      g_cancellable_cancel (d->cancellable);
      set_status (d, "Cancelling...");
      return;
    }
  if (d->state == DF_DIALOG_IDLE)
    {
      d->state = DF_DIALOG_CLOSED;
      if (d->loop != NULL)
        g_main_loop_quit (d->loop);
    }
}

static void
on_response (GtkDialog *dialog, int response, DfDialog *d)
{
  if (response == GTK_RESPONSE_OK)
    {
      df_dialog_generate (d);
      return;
    }
  if (response == GTK_RESPONSE_DELETE_EVENT)
    d->close_requested = TRUE;
  df_dialog_cancel (d);
}

DfJob *
df_dialog_run (DfDialog *d)
{
  DfJob *job;

  g_return_val_if_fail (d != NULL, NULL);

  gtk_widget_show (d->window);
  if (d->state == DF_DIALOG_IDLE || d->state == DF_DIALOG_RUNNING)
    {
      d->loop = g_main_loop_new (NULL, FALSE);
      g_main_loop_run (d->loop);
      g_clear_pointer (&d->loop, g_main_loop_unref);
    }
  gtk_widget_hide (d->window);

  if (d->state != DF_DIALOG_DONE)
    return NULL;
  job = d->job;
  d->job = NULL;
  return job;
}

void
df_dialog_free (DfDialog *d)
{
  if (d == NULL)
    return;

  /* The worker uses d: let it finish before anything goes away. */
  if (d->state == DF_DIALOG_RUNNING)
    {
      g_cancellable_cancel (d->cancellable);
      while (d->state == DF_DIALOG_RUNNING)
        g_main_context_iteration (NULL, TRUE);
    }
  g_mutex_lock (&d->lock);
  if (d->idle_id != 0)
    g_source_remove (d->idle_id);
  d->idle_id = 0;
  g_mutex_unlock (&d->lock);

  gtk_widget_destroy (d->window);
  g_object_unref (d->window);
  g_hash_table_unref (d->widgets);
  g_clear_pointer (&d->job, df_job_free);
  g_clear_error (&d->last_error);
  g_free (d->x0);
  g_mutex_clear (&d->lock);
  g_free (d);
}

GtkWidget *
df_dialog_get_window (DfDialog *d)
{
  return d->window;
}

GtkWidget *
df_dialog_get_widget (DfDialog *d, const char *name)
{
  g_return_val_if_fail (d != NULL && name != NULL, NULL);
  return g_hash_table_lookup (d->widgets, name);
}

void
df_dialog_set_progress_hook (DfDialog *d, DfDialogProgressHook hook,
                             gpointer data)
{
  d->hook = hook;
  d->hook_data = data;
}

void
df_dialog_set_transient_for_xid (DfDialog *d, gulong xid)
{
  d->xid = xid;
  if (gtk_widget_get_realized (d->window))
    on_realize (d->window, d);
}

DfDialogState
df_dialog_get_state (DfDialog *d)
{
  return d->state;
}

const GError *
df_dialog_get_last_error (DfDialog *d)
{
  return d->last_error;
}

int
df_dialog_get_steps_seen (DfDialog *d)
{
  int n;

  g_mutex_lock (&d->lock);
  n = d->worker_steps;
  g_mutex_unlock (&d->lock);
  return n;
}
