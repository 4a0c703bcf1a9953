/* run_model: run a model exported by `kiln export MODEL -o DIR --format c` from C.
 *
 *     run_model WEIGHTS INPUT... OUTPUT...
 *
 * WEIGHTS is DIR/model_weights.bin; each INPUT is a raw file holding one input tensor
 * (C-contiguous, native-endian, of the dtype and shape in model.h, e.g. float32); each
 * OUTPUT is written the same way. Exits 0 on success, 1 with a message on any failure.
 * Build: see README.md in this folder.
 */
#include <stdio.h>
#include <stdlib.h>

#include "model.h"

/* Read exactly `bytes` bytes of `path` into a new buffer; NULL (with a message) otherwise. */
static void* read_file(const char* path, size_t bytes) {
    FILE* f = fopen(path, "rb");
    if (!f) {
        perror(path);
        return NULL;
    }
    void* data = malloc(bytes ? bytes : 1);
    size_t got = data ? fread(data, 1, bytes, f) : 0;
    int longer = fgetc(f) != EOF;
    fclose(f);
    if (!data || got != bytes || longer) {
        fprintf(stderr, "%s: expected %zu bytes\n", path, bytes);
        free(data);
        return NULL;
    }
    return data;
}

static int write_file(const char* path, const void* data, size_t bytes) {
    FILE* f = fopen(path, "wb");
    if (!f) {
        perror(path);
        return -1;
    }
    size_t put = fwrite(data, 1, bytes, f);
    if (fclose(f) != 0 || put != bytes) {
        fprintf(stderr, "%s: write failed\n", path);
        return -1;
    }
    return 0;
}

int main(int argc, char** argv) {
    if (argc != 2 + MODEL_NUM_INPUTS + MODEL_NUM_OUTPUTS) {
        fprintf(stderr, "usage: %s WEIGHTS INPUT x%d OUTPUT x%d\n", argv[0],
                MODEL_NUM_INPUTS, MODEL_NUM_OUTPUTS);
        return 1;
    }
    kiln_model* model = model_load(argv[1]);
    if (!model) {
        fprintf(stderr, "cannot load the model: %s\n", model_error());
        return 1;
    }
    int status = 1;
    const void* inputs[MODEL_NUM_INPUTS + 1] = {0};
    void* outputs[MODEL_NUM_OUTPUTS + 1] = {0};
    for (int i = 0; i < MODEL_NUM_INPUTS; i++) {
        inputs[i] = read_file(argv[2 + i], model_input_info(i)->nbytes);
        if (!inputs[i]) goto done;
    }
    for (int j = 0; j < MODEL_NUM_OUTPUTS; j++) {
        size_t bytes = model_output_info(j)->nbytes;
        outputs[j] = malloc(bytes ? bytes : 1);
        if (!outputs[j]) {
            fprintf(stderr, "out of memory\n");
            goto done;
        }
    }
    if (model_run(model, inputs, outputs) != 0) {
        fprintf(stderr, "run failed: %s\n", model_error());
        goto done;
    }
    for (int j = 0; j < MODEL_NUM_OUTPUTS; j++) {
        const char* path = argv[2 + MODEL_NUM_INPUTS + j];
        if (write_file(path, outputs[j], model_output_info(j)->nbytes) != 0) goto done;
    }
    status = 0;
done:
    for (int i = 0; i < MODEL_NUM_INPUTS; i++) free((void*)inputs[i]);
    for (int j = 0; j < MODEL_NUM_OUTPUTS; j++) free(outputs[j]);
    model_free(model);
    return status;
}
