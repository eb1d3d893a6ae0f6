/* plugin-fixture.h: tiny models for the plug-in and dialog tests, written
 * with the engine itself (fixed-seed init, so every run is the same). */
#pragma once

#include <glib.h>

/* Class names of the tiny UNet; its unconditional class is index 3. */
#define FIXTURE_N_CLASSES 3
#define FIXTURE_SIZE      16
#define FIXTURE_T         100

/* Writes dir/fashion-mnist.safetensors (class-conditional UNet, 1 channel,
 * 16 x 16, T = 100) and dir/fashion-mnist-classifier.safetensors. */
gboolean fixture_write_models (const char *dir, GError **error);
/* Writes a classifier like the fixture's but with the classes apple,
 * banana and cherry: one that must not guide the fixture UNet. */
gboolean fixture_write_other_classifier (const char *path, GError **error);
