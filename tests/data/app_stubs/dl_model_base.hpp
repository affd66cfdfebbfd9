// Minimal stand-ins for the ESP-DL 3.3 declarations `espstream app` code uses, written for
// tests/test_app.py's `g++ -fsyntax-only` check (signatures as in ESP-DL's public headers
// dl_model_base.hpp, dl_tensor_base.hpp, fbs_model.hpp; no implementation).
#pragma once
#include "esp_err.h"
#include "esp_log.h"
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#define MALLOC_CAP_DEFAULT (1 << 12)

namespace dl {
class TensorBase;
}

namespace fbs {
typedef enum {
    MODEL_LOCATION_IN_FLASH_RODATA = 0,
    MODEL_LOCATION_IN_FLASH_PARTITION = 1,
    MODEL_LOCATION_IN_SDCARD = 2,
} model_location_type_t;

class FbsModel {
public:
    void load_map();
    dl::TensorBase *get_test_input_tensor(std::string tensor_name);
    dl::TensorBase *get_test_output_tensor(std::string tensor_name);
};
} // namespace fbs

namespace dl {
typedef enum {
    DATA_TYPE_UNDEFINED = 0,
    DATA_TYPE_FLOAT = 1,
    DATA_TYPE_INT8 = 3,
    DATA_TYPE_INT16 = 5,
} dtype_t;

typedef enum { MEMORY_MANAGER_GREEDY = 0 } memory_manager_t;
typedef enum { RUNTIME_MODE_SINGLE_CORE = 0 } runtime_mode_t;

class TensorBase {
public:
    void *data;
    TensorBase(std::vector<int> shape, const void *element, int exponent = 0,
               dtype_t dtype = DATA_TYPE_FLOAT, bool deep = true, uint32_t caps = MALLOC_CAP_DEFAULT);
    int get_size();
    int get_bytes();
    std::vector<int> get_shape();
    int get_exponent();
    dtype_t get_dtype();
    bool equal(TensorBase *tensor, float epsilon = 1e-6, bool verbose = false);
};

class Model {
public:
    Model(const char *rodata_address_or_partition_label_or_path, const char *model_name,
          fbs::model_location_type_t location = fbs::MODEL_LOCATION_IN_FLASH_RODATA,
          int max_internal_size = 0, memory_manager_t mm_type = MEMORY_MANAGER_GREEDY,
          const uint8_t *key = nullptr, bool param_copy = true,
          const std::map<std::string, std::vector<int>> &input_shapes = {});
    virtual ~Model();
    virtual void run(runtime_mode_t mode = RUNTIME_MODE_SINGLE_CORE);
    virtual void run(TensorBase *input, runtime_mode_t mode = RUNTIME_MODE_SINGLE_CORE);
    esp_err_t test();
    void profile(bool sort_module_by_latency = false);
    virtual std::map<std::string, TensorBase *> &get_inputs();
    virtual std::map<std::string, TensorBase *> &get_outputs();
    virtual void reset();
    virtual fbs::FbsModel *get_fbs_model();
};
} // namespace dl
