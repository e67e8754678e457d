# cmake --install: headers (with the generated export.h and version.h), the
# library, a CMake package (parley::parley) and a pkg-config file.
include(CMakePackageConfigHelpers)

install(TARGETS parley EXPORT parleyTargets
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/parley
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(FILES ${PROJECT_BINARY_DIR}/include/parley/export.h
              ${PROJECT_BINARY_DIR}/include/parley/version.h
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/parley)
install(EXPORT parleyTargets NAMESPACE parley::
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/parley)

configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/parleyConfig.cmake.in
  ${PROJECT_BINARY_DIR}/parleyConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/parley)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/parleyConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/parleyConfig.cmake
              ${PROJECT_BINARY_DIR}/parleyConfigVersion.cmake
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/parley)

configure_file(${PROJECT_SOURCE_DIR}/cmake/parley.pc.in ${PROJECT_BINARY_DIR}/parley.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/parley.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
