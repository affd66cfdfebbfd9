// Stand-in for ESP-IDF's esp_timer.h (tests/test_app.py's syntax check only).
#pragma once
#include <cstdint>
int64_t esp_timer_get_time(void);
