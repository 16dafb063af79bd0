# Helpers shared by every module's CMakeLists.

# pdserve_module(NAME SOURCES ... DEPS ...): one static library per module, named pdserve_NAME,
# with src/ on the include path so headers are included as "module/header.h".
function(pdserve_module name)
  cmake_parse_arguments(ARG "" "" "SOURCES;DEPS" ${ARGN})
  add_library(pdserve_${name} STATIC ${ARG_SOURCES})
  target_include_directories(pdserve_${name} PUBLIC ${PROJECT_SOURCE_DIR}/src)
  target_link_libraries(pdserve_${name} PUBLIC ${ARG_DEPS})
endfunction()

# pdserve_test(NAME SOURCES ... DEPS ... [LABELS ...]): a GoogleTest binary registered with ctest.
# Tests find data and the default model through common/test_paths.h (the paths below, or
# $PDSERVE_TEST_SOURCE_DIR and $PDSERVE_TEST_MODEL where set).
function(pdserve_test name)
  cmake_parse_arguments(ARG "" "TIMEOUT" "SOURCES;DEPS;LABELS" ${ARGN})
  if(NOT PDSERVE_BUILD_TESTS)
    return()
  endif()
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE ${ARG_DEPS} GTest::gtest GTest::gtest_main)
  target_compile_definitions(${name} PRIVATE
    PDSERVE_SOURCE_DIR="${PROJECT_SOURCE_DIR}"
    PDSERVE_DEFAULT_MODEL="${PROJECT_SOURCE_DIR}/models/SmolLM2-135M-Instruct.Q4_1.gguf")
  add_test(NAME ${name} COMMAND ${name})
  set(labels fast)
  if(ARG_LABELS)
    set(labels ${ARG_LABELS})
  endif()
  set(timeout 300)
  if(ARG_TIMEOUT)
    set(timeout ${ARG_TIMEOUT})
  endif()
  set_tests_properties(${name} PROPERTIES LABELS "${labels}" TIMEOUT ${timeout})
endfunction()
