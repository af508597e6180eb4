# Included by the interface packages here after their find_package calls.
# The PyPI message wheels export their *__rosidl_generator_py targets with the
# wheel builder's include dirs (/opt/python/...), which CMake rejects as
# non-existent: point them at this machine's Python and NumPy headers instead.
find_package(Python3 REQUIRED COMPONENTS Interpreter Development NumPy)
get_property(imported_targets DIRECTORY PROPERTY IMPORTED_TARGETS)
foreach(target IN LISTS imported_targets)
  get_target_property(include_dirs ${target} INTERFACE_INCLUDE_DIRECTORIES)
  if(include_dirs MATCHES "/opt/python/")
    set_target_properties(${target} PROPERTIES INTERFACE_INCLUDE_DIRECTORIES
      "${Python3_INCLUDE_DIRS};${Python3_NumPy_INCLUDE_DIRS}")
  endif()
endforeach()
