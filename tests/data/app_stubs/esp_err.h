// Stand-in for ESP-IDF's esp_err.h (tests/test_app.py's syntax check only).
#pragma once
typedef int esp_err_t;
#define ESP_OK 0
#define ESP_FAIL -1
